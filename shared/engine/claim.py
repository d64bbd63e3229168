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

from sqlalchemy import Row, and_, bindparam, case, func, or_, select, update
from sqlalchemy.orm import Session

from shared import checkpoints
from shared.auth.principal import Principal
from shared.clock import aware, utcnow
from shared.engine.outcome import ChatMessage
from shared.models import AgentSession, Turn, TurnStatus, table_of
from shared.turns.fairshare import FirstClaim


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


_turns, _sessions = table_of(Turn), table_of(AgentSession)
_now = bindparam("now", type_=_turns.c.lease_expires_at.type)
# Built once (no per-call construction or cache key): the claim, which also returns what the step reads of
# its turn and sets the turn's deadline at its first claim, and the read of the session.
_CLAIM = (
    update(_turns)
    .where(
        _turns.c.id == bindparam("turn_id"),
        _turns.c.step_count == bindparam("step"),
        _turns.c.status.in_((TurnStatus.QUEUED, TurnStatus.IN_PROGRESS)),
        or_(_turns.c.lease_expires_at.is_(None), _turns.c.lease_expires_at < _now),
        _turns.c.id == select(_sessions.c.active_turn_id).where(_sessions.c.id == _turns.c.session_id)
        .scalar_subquery(),
    )
    .values(
        attempt=_turns.c.attempt + 1,
        step_attempt=_turns.c.step_attempt + 1,
        # A lease still set here lapsed: the attempt holding it died before the sweep noticed.
        step_failures=_turns.c.step_failures + case((_turns.c.lease_expires_at.is_not(None), 1), else_=0),
        lease_owner=bindparam("worker_id"),
        lease_expires_at=bindparam("lease_until", type_=_turns.c.lease_expires_at.type),
        status=TurnStatus.IN_PROGRESS,
        started_at=func.coalesce(_turns.c.started_at, _now),
        # Set once, from the first claim (``deadline``: None without a turn time limit); resuming a pause
        # pushes it back by the time paused. (SET reads the row as it was: NULL started_at is the first claim.)
        deadline_at=case((and_(_turns.c.deadline_at.is_(None), _turns.c.started_at.is_(None)),
                          bindparam("deadline", type_=_turns.c.deadline_at.type)), else_=_turns.c.deadline_at),
    )
    .returning(_turns.c.session_id, _turns.c.attempt, _turns.c.step_attempt, _turns.c.tenant_id, _turns.c.user_id,
               _turns.c.step_failures, _turns.c.input, _turns.c.resume, _turns.c.pending,
               _turns.c.cancel_requested, _turns.c.deadline_at, _turns.c.retry_reason, _turns.c.started_at)
)
# The session and its latest checkpoint (what the history is read from), in one read after the claim.
_SESSION = select(_sessions.c.agent, _sessions.c.event_cursor, *checkpoints.latest_columns(_sessions.c.id)).where(
    _sessions.c.id == bindparam("session_id"))
_SET_DEADLINE = update(_turns).where(_turns.c.id == bindparam("turn_id")).values(deadline_at=bindparam("deadline"))


# The claim of a turn's first step with the fair share's condition (per cap shape), built once each.
_CLAIMS_ADMITTING: dict[tuple[bool, bool], Any] = {}


def _claim(db: Session, turn_id: str, step: int, worker_id: str, lease_seconds: float,
           turn_time_limit: float, first: FirstClaim | None = None) -> tuple[Claim, Row[Any]] | None:
    now = utcnow()
    deadline = now + timedelta(seconds=turn_time_limit) if turn_time_limit > 0 else None
    params = {"turn_id": turn_id, "step": step, "now": now, "worker_id": worker_id,
              "lease_until": now + timedelta(seconds=lease_seconds), "deadline": deadline}
    statement: Any = _CLAIM
    if first is not None:
        statement = _CLAIMS_ADMITTING.get(first.shape)
        if statement is None:
            statement = _CLAIMS_ADMITTING[first.shape] = _CLAIM.where(first.condition)
        params.update(first.params)
    row = db.execute(statement, params).first()
    if row is None:
        return None
    claim = Claim(turn_id, row.session_id, step, row.attempt, row.step_attempt, Principal(row.tenant_id, row.user_id),
                  step_failures=row.step_failures)
    return claim, row


def claim_turn(db: Session, turn_id: str, step: int, worker_id: str, lease_seconds: float,
               turn_time_limit: float = 0) -> Claim | None:
    """Take the lease on ``turn_id`` for ``step``; None if someone else should (or did) run it.

    This is the turn's ``queued`` → ``in_progress`` transition, in one statement (which sets the turn's
    deadline at its first claim, given ``turn_time_limit``).
    """
    claimed = _claim(db, turn_id, step, worker_id, lease_seconds, turn_time_limit)
    return claimed[0] if claimed is not None else None


def claim_and_load(db: Session, turn_id: str, step: int, worker_id: str, lease_seconds: float,
                   turn_time_limit: float, cache: checkpoints.HistoryCache | None = None,
                   first: FirstClaim | None = None) -> tuple[Claim | None, StepInput | None]:
    """:func:`claim_turn`, and what the step needs: the turn as the claim returned it, the session, the history
    as of the latest checkpoint (from ``cache`` when it holds it), each read after the claim (so as of it).
    The input is None if the session is gone. The session and its latest checkpoint are one statement.
    ``first``: the fair share's condition on a turn's first claim (shared.turns.fairshare.first_claim)."""
    claimed = _claim(db, turn_id, step, worker_id, lease_seconds, turn_time_limit, first)
    if claimed is None:
        return None, None
    claim, turn = claimed
    session = db.execute(_SESSION, {"session_id": claim.session_id}).first()
    if session is None:
        return claim, None
    latest = None if session.latest_id is None else (session.latest_id, session.latest_number,
                                                      session.latest_keyframe, session.latest_created_at)
    _, history = checkpoints.load(db, claim.session_id, cache, latest=latest)
    deadline_at = turn.deadline_at
    if deadline_at is None and turn_time_limit > 0 and turn.started_at is not None:
        # Not set at the turn's first claim (no limit then): set from it now.
        deadline_at = aware(turn.started_at) + timedelta(seconds=turn_time_limit)
        db.execute(_SET_DEADLINE, {"turn_id": turn_id, "deadline": deadline_at})
    return claim, StepInput(
        tenant_id=turn.tenant_id, user_id=turn.user_id, session_id=claim.session_id, agent_name=session.agent,
        input=turn.input, resume=turn.resume, pending=turn.pending, cancel=turn.cancel_requested,
        deadline_at=deadline_at, retry_reason=turn.retry_reason,
        history=tuple(history),
        event_cursor=session.event_cursor or 0,
    )
