"""The claim: a step's lease on its turn, taken with one fenced UPDATE, and what the step loads with it.

:func:`claim_turn` takes the lease with a single conditional UPDATE that bumps
the fencing number (``attempt``). A task for a finished turn, for a step already
committed, or for a turn whose lease another worker holds, claims nothing and
exits quietly: duplicate deliveries are harmless. A claim that takes over a
lapsed lease counts the attempt that held it as failed (``step_failures``), as
the lease sweep does when it finds the lease first. Every later write of the step
checks ``attempt``, so a zombie attempt (its lease lapsed and another took
over) changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.orm import Session

from shared import checkpoints
from shared.auth.principal import Principal
from shared.clock import aware, utcnow
from shared.engine.outcome import ChatMessage
from shared.models import AgentSession, Turn, TurnStatus


@dataclass(frozen=True)
class Claim:
    """A lease on one step of one turn, held by one attempt."""

    turn_id: str
    session_id: str
    step: int
    # The fencing number: bumped by every claim of the turn; every write of this attempt checks it.
    attempt: int
    # Claims of this step so far; > 1 means an earlier attempt of it died or was handed back.
    step_attempt: int
    # The turn's owner: every transaction after the claim is scoped to it.
    principal: Principal
    # Attempts of this step that died or failed before this one (hand-backs not counted).
    step_failures: int = 0


@dataclass(frozen=True)
class StepInput:
    """What a step reads once, right after its claim; the connection is released before the model runs."""

    tenant_id: str
    user_id: str
    session_id: str
    agent_name: str
    input: str
    resume: dict[str, Any] | None
    pending: dict[str, Any] | None
    cancel: bool
    deadline_at: datetime | None
    retry_reason: str | None
    # The session's history as of the latest checkpoint.
    history: tuple[ChatMessage, ...]
    # The highest cursor the session's event log is known to have issued (the floor of its appends).
    event_cursor: int = 0


def claim_turn(db: Session, turn_id: str, step: int, worker_id: str, lease_seconds: float) -> Claim | None:
    """Take the lease on ``turn_id`` for ``step``; None if someone else should (or did) run it.

    This is the turn's ``queued`` → ``in_progress`` transition, in one statement.
    """
    now = utcnow()
    active = select(AgentSession.active_turn_id).where(AgentSession.id == Turn.session_id).scalar_subquery()
    row = db.execute(
        update(Turn)
        .where(
            Turn.id == turn_id,
            Turn.step_count == step,
            Turn.status.in_((TurnStatus.QUEUED, TurnStatus.IN_PROGRESS)),
            or_(Turn.lease_expires_at.is_(None), Turn.lease_expires_at < now),
            Turn.id == active,
        )
        .values(
            attempt=Turn.attempt + 1,
            step_attempt=Turn.step_attempt + 1,
            # A lease still set here lapsed: the attempt holding it died before the sweep noticed.
            step_failures=Turn.step_failures + case((Turn.lease_expires_at.is_not(None), 1), else_=0),
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            status=TurnStatus.IN_PROGRESS,
            started_at=func.coalesce(Turn.started_at, now),
        )
        .returning(Turn.session_id, Turn.attempt, Turn.step_attempt, Turn.tenant_id, Turn.user_id,
                   Turn.step_failures)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    return Claim(turn_id, row.session_id, step, row.attempt, row.step_attempt, Principal(row.tenant_id, row.user_id),
                 step_failures=row.step_failures)


def load_step_input(db: Session, claim: Claim, turn_time_limit: float,
                    cache: checkpoints.HistoryCache | None = None) -> StepInput | None:
    """Read what the step needs (turn, session, the history as of the latest checkpoint, from ``cache`` when
    it holds it); None if the turn or session is gone."""
    turn = db.get(Turn, claim.turn_id)
    session = db.get(AgentSession, claim.session_id)
    if turn is None or session is None:
        return None
    _, history = checkpoints.load(db, session.id, cache)
    if turn.deadline_at is None and turn_time_limit > 0 and turn.started_at is not None:
        # Set once, from the first claim; resuming a pause pushes it back by the time paused.
        turn.deadline_at = aware(turn.started_at) + timedelta(seconds=turn_time_limit)
    return StepInput(
        tenant_id=turn.tenant_id, user_id=turn.user_id, session_id=session.id, agent_name=session.agent,
        input=turn.input, resume=turn.resume, pending=turn.pending, cancel=turn.cancel_requested,
        deadline_at=turn.deadline_at, retry_reason=turn.retry_reason,
        history=tuple(history),
        event_cursor=session.event_cursor or 0,
    )
