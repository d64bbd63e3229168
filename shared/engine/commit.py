"""The step's commit: checkpoint, messages, spans, turn progress (and a response without tool calls) in one
fenced transaction.

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
from functools import partial
from typing import Any

from sqlalchemy import JSON, bindparam, case, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from shared import checkpoints
from shared.clock import utcnow
from shared.db import after_commit, database_unavailable, unit_of_work, write_later
from shared.engine.buffer import StepEvents
from shared.engine.claim import Claim
from shared.engine.journal import record_response, record_response_with_commit
from shared.engine.outcome import ChatMessage, StepOutcome, StepResult, for_model
from shared.models import AgentSession, Checkpoint, Message, Turn, TurnStatus, table_of
from shared.runtime import Runtime
from shared.turns import budgets, transitions
from shared.turns.events import Durable, record_rows

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
    events.hand_to_commit()  # what the step still holds goes out with the commit's events (one append)
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
        if result.unrecorded_response is not None and budgets.token_limits(rt.settings):
            # Counting the response's tokens takes the tenant's budget lock: before any row lock, the
            # order every journal write takes them in.
            budgets.lock_tenant(db, claim.principal.tenant_id)
        return _write(db, rt, claim, result, state, events)


def _write(db: Session, rt: Runtime, claim: Claim, result: StepResult, state: list[ChatMessage],
           events: StepEvents) -> TurnStatus | StepOutcome:
    # Core statements built once (below), on the transaction's connection: no ORM object, flush or identity
    # map. Session first, then turn: the same lock order as the API's cancel, create and rollback paths.
    conn = db.connection()
    ids = {"p_session": claim.session_id, "p_turn": claim.turn_id}
    locked = conn.execute(_LOCK_SESSION, ids).first()
    if locked is None:
        return StepOutcome.ZOMBIE  # the session or the turn was deleted: commit nothing
    now = utcnow()
    # The turn's usage as the lock read it: only a fenced commit of the turn writes it, and if another one
    # ran since this attempt's claim, the fence below fails.
    usage = dict(locked.usage or {})
    for key, value in result.usage.items():
        usage[key] = usage.get(key, 0) + value
    usage["steps"] = claim.step + 1
    params: dict[str, Any] = {**ids, "p_attempt": claim.attempt, "p_step": claim.step, "p_next": claim.step + 1,
                              "p_text": result.text, "p_usage": usage, "p_pending": result.pending, "p_now": now}
    status = result.status
    # The fenced update writes the step's progress and the turn's next state in one statement; it returns
    # what the commit goes on with, the session's latest checkpoint included (it is read after the session
    # row is locked, so no other commit numbers one meanwhile).
    if status == TurnStatus.IN_PROGRESS:
        fenced = conn.execute(_ADVANCE, params).first()
    elif status == TurnStatus.REQUIRES_ACTION:
        pending, expires = transitions.paused_pending(rt, result.pending or {}, now)
        fenced = conn.execute(_PAUSE, {**params, "p_pending": pending, "p_expires": expires}).first()
    else:
        fenced = conn.execute(_FINISH, {**params, "p_status": TurnStatus(status).value,
                                        "p_error": result.error}).first()
    if fenced is None:
        return StepOutcome.ZOMBIE  # another attempt owns the turn now (or it was deleted): commit nothing
    was_running = locked.status == TurnStatus.IN_PROGRESS
    ended = fenced
    if status == TurnStatus.IN_PROGRESS and fenced.cancel_requested:
        # Cancelled while the step ran: the turn ends here (rare: a second statement).
        status, was_running = TurnStatus.CANCELLED, fenced.status == TurnStatus.IN_PROGRESS
        ended = conn.execute(_CANCEL, {**params, "p_error": result.error}).one()
    # The checkpoint holds what the step added, after the latest one (shared/checkpoints.py).
    previous = checkpoints.tip_of(*fenced[:5])
    clean = [for_model(m) for m in result.new_messages]
    number = previous.number + 1 if previous else 1
    owner = claim.principal
    write_later(db, _INSERT_CHECKPOINT, {
        "session_id": claim.session_id, "tenant_id": owner.tenant_id, "user_id": owner.user_id, "number": number,
        "turn_id": claim.turn_id, "step": claim.step, "state": checkpoints.next_state(previous, state, clean),
        "created_at": now})
    # This process's next step of the session finds this checkpoint's history without reading it (the row
    # known by its number and the time written into it: its id would cost a round trip).
    after_commit(db, partial(rt.history_cache.put, claim.session_id, now, number, [*state, *clean]))
    # Statements whose results the commit reads (the fair share's lock and candidates) go on their own round
    # trips, the held writes ahead of them; the writes after them are held and sent with the COMMIT
    # (shared.db.write_later).
    if result.unrecorded_response is not None:
        # The model's answer, recorded with the step it produced (journal.py): fenced by the update above.
        # Held, unless a failed tool start may have recorded it already (then read, so as not to count twice).
        if result.response_maybe_recorded:
            record_response(db, claim, result.unrecorded_response)
        else:
            record_response_with_commit(db, claim, result.unrecorded_response)
    # The step's durable events commit with it (shared/turns/events.py): its tool calls and results, and
    # step.completed with the step's text, which is what a client keeps; then the turn's own, if it changed.
    published: list[Durable] = [*events.durable, Durable.new("step.completed", claim.turn_id, {
        "step": claim.step, "attempt": claim.step_attempt, "usage": result.usage, "text": result.text})]
    active = locked.active_turn_id
    # An advancing step's next one is sent once its events are published (below).
    if status == TurnStatus.REQUIRES_ACTION:
        transitions.paused(db, rt, claim.turn_id, owner)
        published.append(Durable.new(*transitions.paused_event(claim.turn_id, pending)))
    elif status != TurnStatus.IN_PROGRESS:
        transitions.finished(db, rt, claim.turn_id, owner, status, was_running=was_running)
        published.append(Durable.new(*transitions.finished_event(claim.turn_id, status, ended.output, result.error)))
        if active == claim.turn_id:  # hand the session to its next queued turn (fetched by the update)
            active = ended.next_turn_id
            if active is not None:
                transitions.activated(db, rt, active, now)
    events.trace.write(db, locked.enqueued_at, result)  # the spans commit (or not) with the step
    if result.new_messages:
        write_later(db, _INSERT_MESSAGES, [
            {"session_id": claim.session_id, "tenant_id": owner.tenant_id, "user_id": owner.user_id,
             "turn_id": claim.turn_id, "step": claim.step, "role": m["role"], "content": m.get("content") or "",
             "tool_calls": m.get("tool_calls"), "tool_call_id": m.get("tool_call_id"), "name": m.get("name"),
             "status": m.get("_status", "complete"), "created_at": now} for m in result.new_messages])
    # What the step still holds (its last deltas; events held for want of a heartbeat vouching for the lease,
    # on a starved worker) goes out ahead of these, in their append: the commit, once it lands, vouches for it.
    record_rows(db, rt, owner, claim.session_id, published, held=events.take_held)
    if status == TurnStatus.IN_PROGRESS:
        # Sent after the step's events are published (callbacks run in order): the next step's events follow
        # them in the log, and its claim, here, marks them published in its own transaction.
        transitions.advanced(db, rt, claim.turn_id, claim.step + 1)
    # The session's one UPDATE: the event cursor floor raised past every cursor the step saw, its active turn.
    write_later(db, _UPDATE_SESSION, {"p_session": claim.session_id, "p_now": now, "p_active": active,
                                      "p_cursor": max(events.high, locked.event_cursor or 0)})
    return status


def release_step(rt: Runtime, claim: Claim, reason: str, *, failed: bool = False) -> None:
    """Give the lease back so the next attempt may start now; ``reason`` is shown in its step.retrying.

    ``failed``: the attempt failed (it counts towards STEPRUN_MAX_ATTEMPTS); a hand-back (the default,
    e.g. a worker shutting down) does not.
    """
    with unit_of_work(rt.sessions, claim.principal) as db:
        transitions.release(db, claim.turn_id, claim.attempt, reason, failed=failed)


# The commit's statements, built once: each execution only binds its values (no statement construction,
# and the cache key of each is computed once). Bound names are apart from the columns' (a parameter named
# as a column would join the SET clause).
_sessions, _turns = table_of(AgentSession), table_of(Turn)
_now = bindparam("p_now", type_=_turns.c.finished_at.type)
# A JSON column's None as SQL NULL (what a turn's unset error or pending is), not JSON 'null'.
_json_or_null = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
# The session's row, locked; the turn's columns the commit needs ride along, read, not locked (the fenced
# update locks the turn's row next).
_LOCK_SESSION = (
    select(_sessions.c.active_turn_id, _sessions.c.event_cursor, _turns.c.status, _turns.c.usage,
           _turns.c.enqueued_at)
    .select_from(_sessions.join(_turns, _turns.c.session_id == _sessions.c.id))
    .where(_sessions.c.id == bindparam("p_session"), _turns.c.id == bindparam("p_turn"))
    .with_for_update(of=_sessions))
_queued = _turns.alias("queued")
# What transitions.activate_next picks: the session's oldest queued turn that is due.
_NEXT_QUEUED = (select(_queued.c.id)
                .where(_queued.c.session_id == bindparam("p_session"), _queued.c.status == TurnStatus.QUEUED.value,
                       _queued.c.id != bindparam("p_turn"),
                       or_(_queued.c.scheduled_at.is_(None), _queued.c.scheduled_at <= _now))
                .order_by(_queued.c.seq).limit(1).scalar_subquery().label("next_turn_id"))


def _fenced(changes: dict[str, Any], *returning: Any) -> Any:
    """The fenced update of the step's progress and ``changes`` (the turn's next state), returning the
    session's latest checkpoint (first five columns, :func:`checkpoints.tip_of`) and ``returning``."""
    return (update(_turns)
            .where(_turns.c.id == bindparam("p_turn"), _turns.c.attempt == bindparam("p_attempt"),
                   _turns.c.step_count == bindparam("p_step"))
            .values(step_count=bindparam("p_next"), step_attempt=0, step_failures=0, lease_owner=None,
                    lease_expires_at=None, retry_reason=None, resume=None,
                    output=func.coalesce(_turns.c.output, "") + bindparam("p_text", type_=_turns.c.output.type),
                    usage=bindparam("p_usage", type_=_turns.c.usage.type),
                    pending=bindparam("p_pending", type_=_json_or_null), **changes)
            .returning(*checkpoints.tip_columns(bindparam("p_session")), *returning))


# transitions.advance: in progress, the next step sent after commit (unless a cancel came: see _CANCEL).
_ADVANCE = _fenced({"enqueued_at": case((_turns.c.cancel_requested, _turns.c.enqueued_at), else_=_now)},
                   _turns.c.cancel_requested, _turns.c.status)
# transitions.pause: requires_action until the action deadline.
_PAUSE = _fenced({"status": TurnStatus.REQUIRES_ACTION.value, "paused_at": _now,
                  "action_expires_at": bindparam("p_expires", type_=_turns.c.action_expires_at.type)})
# transitions.finish: a terminal status.
_finished = {"finished_at": _now, "error": bindparam("p_error", type_=_json_or_null)}
_FINISH = _fenced({"status": bindparam("p_status", type_=_turns.c.status.type), **_finished},
                  _turns.c.output, _NEXT_QUEUED)
_CANCEL = (update(_turns).where(_turns.c.id == bindparam("p_turn"))
           .values(status=TurnStatus.CANCELLED.value, **_finished).returning(_turns.c.output, _NEXT_QUEUED))
_INSERT_CHECKPOINT = insert(table_of(Checkpoint))
_INSERT_MESSAGES = insert(table_of(Message))
_UPDATE_SESSION = (update(_sessions).where(_sessions.c.id == bindparam("p_session"))
                   .values(event_cursor=bindparam("p_cursor"), active_turn_id=bindparam("p_active"),
                           updated_at=_now))
