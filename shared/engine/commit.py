"""The step's commit: checkpoint, messages, spans and turn progress in one fenced transaction.

The transaction first checks the fencing number (``attempt``) and the step
number, so a zombie attempt (its lease lapsed and another took over) commits
nothing, and a commit repeated after a dropped connection is a no-op. After the
commit, events are published and the next step enqueued (both through
:func:`shared.db.after_commit`). A crash between the two is covered by the
scheduler: the commit stamped ``enqueued_at`` with no lease, which is what the
lost-task sweep looks for.
"""
from __future__ import annotations

import logging
import time

from sqlalchemy import select, update

from shared import checkpoints
from shared.clock import utcnow
from shared.db import database_unavailable, unit_of_work
from shared.engine.buffer import StepEvents
from shared.engine.claim import Claim
from shared.engine.outcome import ChatMessage, StepOutcome, StepResult, for_model
from shared.models import AgentSession, Checkpoint, Message, Turn, TurnStatus
from shared.runtime import Runtime
from shared.turns import transitions

log = logging.getLogger(__name__)

# Pauses between commit attempts while the database is unreachable (about half a minute in all).
COMMIT_RETRY_DELAYS = (0.25, 0.5, 1.0) + (2.0,) * 14


def commit_step(rt: Runtime, claim: Claim, result: StepResult, state: list[ChatMessage],
                events: StepEvents) -> TurnStatus | StepOutcome:
    """Write the step's outcome if this attempt still holds the turn, riding out a database restart.

    The work of the step is in memory only: losing it to a short outage would cost
    a whole new model call. Repeating the commit is safe because the fence also
    checks the step number: a commit that reached the database just before the
    connection dropped turns the repeat into a no-op.
    """
    events.flush()
    for delay in COMMIT_RETRY_DELAYS:
        try:
            return _commit_once(rt, claim, result, state, events)
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            log.warning("turn %s step %s: database unavailable at commit, retrying in %ss: %s",
                        claim.turn_id, claim.step, delay, exc)
            time.sleep(delay)
    return _commit_once(rt, claim, result, state, events)


def _commit_once(rt: Runtime, claim: Claim, result: StepResult, state: list[ChatMessage],
                 events: StepEvents) -> TurnStatus | StepOutcome:
    with unit_of_work(rt.sessions, claim.principal) as db:
        # Session first, then turn: the same lock order as the API's cancel and create paths.
        session = db.scalars(select(AgentSession).where(AgentSession.id == claim.session_id)
                             .with_for_update()).first()
        # The fenced update returns the turn's row: no second read of it.
        turn = db.scalars(
            update(Turn).where(Turn.id == claim.turn_id, Turn.attempt == claim.attempt, Turn.step_count == claim.step)
            .values(step_count=claim.step + 1, step_attempt=0, step_failures=0, lease_owner=None,
                    lease_expires_at=None, retry_reason=None)
            .returning(Turn), execution_options={"populate_existing": True}
        ).first()
        if session is None or turn is None:
            return StepOutcome.ZOMBIE  # another attempt owns the turn now (or it was deleted): commit nothing
        events.trace.write(db, turn, result)  # the spans commit (or not) with the step
        # The checkpoint holds what the step added, after the latest one (shared/checkpoints.py); the session
        # row is locked, so no other commit numbers one meanwhile.
        previous = checkpoints.latest(db, session.id)
        clean = [for_model(m) for m in result.new_messages]
        db.add(Checkpoint(session_id=session.id, tenant_id=turn.tenant_id, user_id=turn.user_id,
                          number=previous[0] + 1 if previous else 1, turn_id=turn.id, step=claim.step,
                          state=checkpoints.next_state(previous, state, clean)))
        for m in result.new_messages:
            db.add(Message(session_id=session.id, tenant_id=turn.tenant_id, user_id=turn.user_id, turn_id=turn.id,
                           step=claim.step, role=m["role"], content=m.get("content") or "",
                           tool_calls=m.get("tool_calls"), tool_call_id=m.get("tool_call_id"),
                           name=m.get("name"), status=m.get("_status", "complete")))
        turn.output = (turn.output or "") + result.text
        usage = dict(turn.usage or {})
        for key, value in result.usage.items():
            usage[key] = usage.get(key, 0) + value
        usage["steps"] = claim.step + 1
        turn.usage = usage
        turn.resume = None
        turn.pending = result.pending
        session.updated_at = utcnow()
        # The step's durable events commit with it (shared/turns/events.py): its tool calls and
        # results, and step.completed with the step's text, which is what a client keeps.
        transitions.publish_after_commit(db, rt, session, [*events.durable, (
            "step.completed", turn.id, {"step": claim.step, "attempt": claim.step_attempt, "usage": result.usage,
                                        "text": result.text})], cursor=events.high)
        status = result.status
        if status == TurnStatus.IN_PROGRESS and turn.cancel_requested:
            status = TurnStatus.CANCELLED
        if status == TurnStatus.IN_PROGRESS:
            transitions.advance(db, rt, turn, claim.step + 1)
        elif status == TurnStatus.REQUIRES_ACTION:
            transitions.pause(db, rt, turn, session, result.pending or {})
        else:
            transitions.finish(db, rt, turn, session, status, result.error)
    return status


def release_step(rt: Runtime, claim: Claim, reason: str, *, failed: bool = False) -> None:
    """Give the lease back so the next attempt may start now; ``reason`` is shown in its step.retrying.

    ``failed``: the attempt failed (it counts towards STEPRUN_MAX_ATTEMPTS); a hand-back (the default,
    e.g. a worker shutting down) does not.
    """
    with unit_of_work(rt.sessions, claim.principal) as db:
        transitions.release(db, claim.turn_id, claim.attempt, reason, failed=failed)
