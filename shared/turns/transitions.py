"""Every change of a turn's status, in one place: the state machine of DESIGN section 3.

```
queued → in_progress ⇄ requires_action → completed | failed | cancelled | expired | incomplete
```

- ``queued`` → ``in_progress``: the worker's claim (:func:`shared.engine.claim.claim_turn`,
  one fenced UPDATE) or :func:`resume` (an answer to a pause).
- ``in_progress`` → next step: :func:`advance`; → ``requires_action``: :func:`pause`.
- → a terminal status: :func:`finish`, the only way a turn ends; it hands the session
  to the next queued turn (:func:`activate`).
- :func:`request_cancel` ends a turn no step is running, or flags the running step.
- :func:`roll_back` ends a turn at once, running step or not, before it is deleted
  (:func:`shared.turns.service.rollback_turn`).
- :func:`release` gives a step's lease back for a fresh attempt (the status stays).

Functions take the database session first and never commit; what must wait for
the commit (enqueueing a step, publishing events) goes through
:func:`shared.db.after_commit`. Callers hold the session row lock, then the turn's.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session

from shared.auth.principal import Principal
from shared.clock import aware, utcnow
from shared.db import after_commit, write_later
from shared.metrics import TURNS_FINISHED
from shared.models import TERMINAL, AgentSession, Turn, TurnStatus, table_of
from shared.runtime import Runtime
from shared.turns import fairshare
from shared.turns.events import Durable, record
from shared.webhooks.outbox import insert_turn_event, record_turn_event


def activate(db: Session, rt: Runtime, session: AgentSession, turn: Turn) -> None:
    """Make ``turn`` the session's active turn and send its first step after commit."""
    session.active_turn_id = turn.id
    turn.enqueued_at = utcnow()
    turn_id = turn.id
    after_commit(db, lambda: rt.queue.enqueue_step(turn_id, 0))


def activated(db: Session, rt: Runtime, turn_id: str, now: datetime) -> None:
    """:func:`activate` for the step's commit, which makes ``turn_id`` the session's active turn in its own
    UPDATE of the session: the turn's send time, and its first step sent after commit."""
    write_later(db, _SENT, {"p_turn": turn_id, "p_now": now})
    after_commit(db, lambda: rt.queue.enqueue_step(turn_id, 0))


_turns = table_of(Turn)
_SENT = update(_turns).where(_turns.c.id == bindparam("p_turn")).values(
    enqueued_at=bindparam("p_now", type_=_turns.c.enqueued_at.type))


def finish(db: Session, rt: Runtime, turn: Turn, session: AgentSession, status: TurnStatus,
                error: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> None:
    """End a turn (status is terminal), publish it, and hand the session to the next queued turn."""
    was_running = turn.status == TurnStatus.IN_PROGRESS
    event = finished_event(turn.id, status, turn.output, error, extra)
    turn.status = status
    turn.finished_at = utcnow()
    turn.lease_owner = None
    turn.lease_expires_at = None
    turn.error = error
    publish_after_commit(db, rt, session, [event])
    record_turn_event(db, turn, status)  # the webhook outbox: in this transaction, so never lost nor invented
    _finished(db, rt, turn.tenant_id, turn.user_id, status, was_running)
    if session.active_turn_id == turn.id:
        session.active_turn_id = None
        activate_next(db, rt, session, exclude=turn.id)


def finished_event(turn_id: str, status: TurnStatus, output: str, error: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> tuple[str, str, dict[str, Any]]:
    """The event of a turn ending in ``status`` (terminal) with ``output`` and ``error``."""
    if status not in TERMINAL:
        raise ValueError(f"finish() takes a terminal status, not {status!r}")
    data: dict[str, Any] = dict(extra or {})
    if status == TurnStatus.COMPLETED:
        data["output"] = output
    if error:
        data["error"] = error
    return f"turn.{status}", turn_id, data


def finished(db: Session, rt: Runtime, turn_id: str, owner: Principal, status: TurnStatus, *,
             was_running: bool) -> None:
    """:func:`finish` for the step's commit, which wrote the turn's row, its event and the session's row
    itself (Core statements, shared/engine/commit.py): the webhook event, and the slot freed."""
    _finished(db, rt, owner.tenant_id, owner.user_id, status, was_running)  # first: its wake-up reads
    insert_turn_event(db, turn_id, owner.tenant_id, owner.user_id, status)  # a held write (write_later)


def _finished(db: Session, rt: Runtime, tenant_id: str, user_id: str, status: TurnStatus, was_running: bool) -> None:
    after_commit(db, lambda: TURNS_FINISHED.labels(status=status).inc())
    if was_running:  # its worker slot is free: the oldest turn deferred for it may start
        fairshare.slot_freed(db, rt, tenant_id, user_id)


def activate_next(db: Session, rt: Runtime, session: AgentSession, exclude: str | None = None) -> Turn | None:
    """Hand an idle session to its oldest queued turn that is due (a delayed turn waits for its time)."""
    nxt = db.scalars(
        select(Turn).where(Turn.session_id == session.id, Turn.status == TurnStatus.QUEUED, Turn.id != exclude,
                           or_(Turn.scheduled_at.is_(None), Turn.scheduled_at <= utcnow()))
        .order_by(Turn.seq).limit(1)
    ).first()
    if nxt is not None:
        activate(db, rt, session, nxt)
    return nxt


def publish_after_commit(db: Session, rt: Runtime, session: AgentSession,
                         events: list[Durable | tuple[str, str | None, dict[str, Any] | None]],
                         cursor: int = 0) -> None:
    """Publish ``events`` once the transaction commits; the durable ones are written in it too
    (:mod:`shared.turns.events`), so they reach the log even if this publish fails."""
    record(db, rt, session, events, cursor=cursor)


def request_cancel(db: Session, rt: Runtime, turn: Turn, session: AgentSession) -> None:
    """Cancel now if no step runs; otherwise flag it and let the running step stop itself."""
    turn.cancel_requested = True
    if turn.lease_expires_at is not None and aware(turn.lease_expires_at) > utcnow():
        # A step is running: it sees the flag within one delta flush or heartbeat.
        after_commit(db, lambda: rt.events.request_cancel(turn.id))
        return
    finish(db, rt, turn, session, TurnStatus.CANCELLED)


def roll_back(db: Session, rt: Runtime, turn: Turn, session: AgentSession, reason: str) -> None:
    """End ``turn`` now as ``cancelled``, whether or not a step is running, so that it can be deleted.

    Watchers of the turn see ``turn.cancelled`` (with ``rolled_back``) and stop. A running
    step cannot commit afterwards: its lease is cleared here and the turn row is deleted in
    the same transaction, so its heartbeat and its fenced commit find nothing (a zombie);
    the cancel flag stops it at the next flush.
    """
    turn_id = turn.id
    running = turn.lease_expires_at is not None and aware(turn.lease_expires_at) > utcnow()
    turn.cancel_requested = True
    finish(db, rt, turn, session, TurnStatus.CANCELLED, extra={"reason": reason, "rolled_back": True})
    if running:
        after_commit(db, lambda: rt.events.request_cancel(turn_id))


def advance(db: Session, rt: Runtime, turn: Turn, next_step: int) -> None:
    """The committed step asked for another: stays ``in_progress``, and ``next_step`` is sent after commit."""
    turn.enqueued_at = utcnow()
    advanced(db, rt, turn.id, next_step)


def advanced(db: Session, rt: Runtime, turn_id: str, next_step: int) -> None:
    """:func:`advance` once the turn's row has its send time (the step's commit writes it itself)."""
    after_commit(db, lambda: rt.queue.enqueue_step(turn_id, next_step))


def pause(db: Session, rt: Runtime, turn: Turn, session: AgentSession, pending: dict[str, Any]) -> None:
    """``in_progress`` → ``requires_action``: wait (holding nothing) for the user, until the action deadline."""
    now = utcnow()
    pending, expires = paused_pending(rt, pending, now)
    # The scheduler expires the pause at action_expires_at (shared/turns/housekeeping.py).
    turn.status, turn.pending, turn.paused_at, turn.action_expires_at = (
        TurnStatus.REQUIRES_ACTION, pending, now, expires)
    fairshare.slot_freed(db, rt, turn.tenant_id, turn.user_id)  # a paused turn holds no worker slot
    publish_after_commit(db, rt, session, [paused_event(turn.id, pending)])
    record_turn_event(db, turn, TurnStatus.REQUIRES_ACTION)


def paused_pending(rt: Runtime, pending: dict[str, Any], now: datetime) -> tuple[dict[str, Any], datetime]:
    """(what a turn paused at ``now`` waits for, with its deadline; that deadline)."""
    expires = now + timedelta(seconds=rt.settings.action_timeout_seconds)
    return {**pending, "expires_at": expires.isoformat().replace("+00:00", "Z")}, expires


def paused_event(turn_id: str, pending: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    return "turn.requires_action", turn_id, {"reason": pending.get("reason"), "pending": pending,
                                             "expires_at": pending["expires_at"]}


def paused(db: Session, rt: Runtime, turn_id: str, owner: Principal) -> None:
    """:func:`pause` for the step's commit, which wrote the turn's row and its event itself: the slot freed,
    and the webhook event."""
    fairshare.slot_freed(db, rt, owner.tenant_id, owner.user_id)  # a paused turn holds no worker slot
    insert_turn_event(db, turn_id, owner.tenant_id, owner.user_id, TurnStatus.REQUIRES_ACTION)


def resume(db: Session, rt: Runtime, turn: Turn, answer: dict[str, Any]) -> None:
    """``requires_action`` → ``in_progress`` with the user's answer; the paused step is sent again after commit."""
    turn.resume = answer
    turn.status = TurnStatus.IN_PROGRESS
    now = utcnow()
    if turn.deadline_at is not None and turn.paused_at is not None:
        # Time spent waiting for the user does not count against STEPRUN_TURN_TIME_LIMIT.
        turn.deadline_at = aware(turn.deadline_at) + (now - aware(turn.paused_at))
    turn.paused_at = turn.action_expires_at = None
    turn.enqueued_at = now
    turn_id, step = turn.id, turn.step_count
    after_commit(db, lambda: rt.queue.enqueue_step(turn_id, step))


def release(db: Session, turn_id: str, attempt: int, reason: str, *, failed: bool = False) -> None:
    """Give ``attempt``'s lease back so the next attempt may start now; ``reason`` shows in its step.retrying.

    ``failed``: count the attempt in ``step_failures`` (STEPRUN_MAX_ATTEMPTS); a hand-back (the default) is not.
    """
    db.execute(update(Turn).where(Turn.id == turn_id, Turn.attempt == attempt)
               .values(lease_owner=None, lease_expires_at=None, enqueued_at=utcnow(), retry_reason=reason,
                       step_failures=Turn.step_failures + (1 if failed else 0))
               .execution_options(synchronize_session=False))
