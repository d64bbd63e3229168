"""Sweeps that make Postgres, not the broker, the guarantee that every turn finishes.

Each sweep is one conditional UPDATE ... RETURNING, so two schedulers running
at once never re-enqueue the same turn twice in one round, and a duplicate
task that slips through is harmless anyway (the claim is fenced).

A killed worker takes two things with it: the steps it was running (their
leases lapse: :func:`recover_expired_leases`, counted as failed attempts) and
the step tasks it had taken from the broker but not claimed yet (kombu keeps
them unacknowledged for the visibility timeout, far too long to wait).
:func:`recover_lost_tasks` reads the broker's queue: a step nobody claimed
for STEPRUN_UNCLAIMED_TASK_SECONDS whose task is not waiting there is re-sent
at once, and one still waiting is left alone (no duplicate piles up behind a
backlog). Where the queue cannot be read, STEPRUN_LOST_TASK_SECONDS applies.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from sqlalchemy import and_, select, tuple_, update

from shared.auth.principal import SYSTEM
from shared.clock import utcnow
from shared.db import after_commit, unit_of_work
from shared.models import AgentSession, Turn, TurnStatus
from shared.runtime import Runtime
from shared.turns.events import republish_unpublished
from shared.turns.fairshare import wake_deferred
from shared.turns.housekeeping import expire_paused_turns

log = logging.getLogger(__name__)
# Shown in the next attempt's step.retrying, and in the error if the turn runs out of attempts.
LEASE_EXPIRED = "the worker running it stopped renewing its lease (killed, crashed or stalled)"


@dataclass
class SweepReport:
    expired_leases: int = 0
    # Unclaimed steps re-sent: their task was not in the queue, or (queue unreadable) they waited too long.
    lost_tasks: int = 0
    expired_actions: int = 0
    # Durable events published by the sweep because their commit could not (shared/turns/events.py).
    republished_events: int = 0
    # Turns waiting for a running slot (shared/turns/fairshare.py) sent because one is free.
    deferred_woken: int = 0

    def __bool__(self) -> bool:
        return bool(self.expired_leases or self.lost_tasks or self.expired_actions or self.republished_events
                    or self.deferred_woken)


def _resend(rt: Runtime, conditions: list[Any], values: dict[str, Any], why: str) -> int:
    """Claim matching turns back in one UPDATE ... RETURNING and re-send each one's current step after commit.

    ``why`` is logged per turn, formatted with the turn id and step.
    """
    with unit_of_work(rt.sessions, SYSTEM) as db:
        rows = db.execute(
            update(Turn)
            .where(*conditions)
            .values(**values)
            .returning(Turn.id, Turn.step_count)
            .execution_options(synchronize_session=False)
        ).all()
        for row in rows:
            log.warning(why, row.id, row.step_count)
            after_commit(db, partial(rt.queue.enqueue_step, row.id, row.step_count))
    return len(rows)


def _active_turn() -> Any:
    """The session's active turn, as a correlated subquery on the turn's session."""
    return select(AgentSession.active_turn_id).where(AgentSession.id == Turn.session_id).scalar_subquery()


def recover_expired_leases(rt: Runtime) -> int:
    """Steps whose worker stopped heartbeating: hand them to another worker; the attempt counts as failed."""
    now = utcnow()
    return _resend(
        rt,
        [Turn.status == TurnStatus.IN_PROGRESS, Turn.lease_expires_at < now],
        {"lease_owner": None, "lease_expires_at": None, "enqueued_at": now, "retry_reason": LEASE_EXPIRED,
         "step_failures": Turn.step_failures + 1},
        "turn %s: lease expired during step %s; re-enqueued",
    )


def _waiting_steps(rt: Runtime) -> set[tuple[str, int]] | None:
    """The steps whose task waits in the broker's queue, or None if the queue cannot be read."""
    read = getattr(rt.queue, "waiting_steps", None)
    if read is None:
        return None  # the embedded queue: nothing is taken and then lost while the process lives
    try:
        waiting: set[tuple[str, int]] | None = read()
    except Exception:  # noqa: BLE001 - the broker is away: the plain threshold applies
        log.warning("sweep: the broker's queue could not be read", exc_info=True)
        return None
    return waiting


def recover_lost_tasks(rt: Runtime) -> int:
    """Active turns nobody claimed whose task is gone (taken by a worker that died, or lost with Redis).

    Read before the database, so a task sent after the read is at worst sent twice (harmless).
    """
    waiting = _waiting_steps(rt)
    now = utcnow()
    if waiting is None:
        seconds, why = rt.settings.lost_task_seconds, "no worker took step %s for {}s"
        conditions: list[Any] = []
    else:
        seconds, why = rt.settings.unclaimed_task_seconds, "step %s unclaimed for {}s and not in the queue"
        conditions = [tuple_(Turn.id, Turn.step_count).not_in(sorted(waiting))] if waiting else []
    stale = now - timedelta(seconds=seconds)
    return _resend(
        rt,
        [
            Turn.status.in_((TurnStatus.QUEUED, TurnStatus.IN_PROGRESS)),
            Turn.lease_expires_at.is_(None),
            and_(Turn.enqueued_at.is_not(None), Turn.enqueued_at < stale),
            Turn.id == _active_turn(),
            *conditions,
        ],
        {"enqueued_at": now},
        "turn %s: " + why.format(seconds) + "; re-enqueued",
    )


def sweep(rt: Runtime) -> SweepReport:
    """One round of recovery: dead workers' steps, lost tasks, pauses past their deadline, unpublished events."""
    report = SweepReport(expired_leases=recover_expired_leases(rt), lost_tasks=recover_lost_tasks(rt),
                         expired_actions=expire_paused_turns(rt), deferred_woken=wake_deferred(rt))
    try:
        report.republished_events = republish_unpublished(rt)
    except Exception:  # noqa: BLE001 - the event log is away: the next round tries again
        log.warning("sweep: durable events could not be republished yet", exc_info=True)
    return report


def recover_after_restart(rt: Runtime) -> int:
    """Embedded mode only: the process that held every lease and queued task is gone.

    `steprun dev` is the only worker of its database, so at start-up every
    active turn's in-flight step was lost with the previous process: send each
    one again now instead of waiting out the lease and lost-task timeouts.
    """
    return _resend(
        rt,
        [Turn.status.in_((TurnStatus.QUEUED, TurnStatus.IN_PROGRESS)), Turn.id == _active_turn()],
        {"lease_owner": None, "lease_expires_at": None, "enqueued_at": utcnow()},
        "turn %s: resuming step %s after a restart",
    )
