"""The scheduler's housekeeping: pauses that expire, idle sessions, old checkpoints.

:func:`expire_paused_turns` runs with every sweep: a turn waiting in
``requires_action`` past its deadline becomes ``expired`` and hands the session
to the next queued turn. The rest runs every ``lifecycle_interval`` through
:func:`run_housekeeping`: idle sessions are deleted with their data (when a TTL is
set), old checkpoints are pruned, and broker messages stranded by killed
workers are handed back to the broker so they do not pile up in Redis.

Every function here is a system path (it acts for all tenants) and is safe to
run from two schedulers at once: rows are locked with SKIP LOCKED or re-checked
under a lock, so the second one finds nothing left to do.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select

from shared import checkpoints
from shared.auth.principal import SYSTEM
from shared.clock import aware, utcnow
from shared.db import after_commit, rowcount, unit_of_work
from shared.models import AgentSession, Checkpoint, Turn, TurnStatus
from shared.runtime import Runtime
from shared.turns import transitions

log = logging.getLogger(__name__)
BATCH = 200


def expire_paused_turns(rt: Runtime, limit: int = BATCH) -> int:
    """Turns nobody resumed before their action deadline: ``expired``, and the session moves on."""
    now = utcnow()
    with unit_of_work(rt.sessions, SYSTEM) as db:
        due = db.execute(
            select(Turn.id, Turn.session_id)
            .where(Turn.status == TurnStatus.REQUIRES_ACTION, Turn.action_expires_at < now)
            .order_by(Turn.action_expires_at).limit(limit)
        ).all()
    expired = 0
    timeout = rt.settings.action_timeout_seconds
    for turn_id, session_id in due:
        with unit_of_work(rt.sessions, SYSTEM) as db:
            # Session, then turn: the lock order of resume and cancel. An answer racing the
            # deadline either lands first (the turn runs on) or finds the turn expired (409).
            session = db.scalars(select(AgentSession).where(AgentSession.id == session_id)
                                 .with_for_update()).first()
            turn = db.scalars(select(Turn).where(Turn.id == turn_id).with_for_update()).first()
            if (session is None or turn is None or turn.status != TurnStatus.REQUIRES_ACTION
                    or turn.action_expires_at is None or aware(turn.action_expires_at) >= now):
                continue
            reason = (turn.pending or {}).get("reason", "an answer")
            transitions.finish(db, rt, turn, session, TurnStatus.EXPIRED, {
                "code": "action_timeout",
                "message": f"the turn waited for {reason} longer than STEPRUN_ACTION_TIMEOUT_SECONDS "
                           f"({timeout:g} s) and nobody resumed it"})
            expired += 1
        log.info("turn %s: requires_action expired", turn_id)
    return expired


def expire_idle_sessions(rt: Runtime, limit: int = BATCH) -> int:
    """Delete sessions idle longer than STEPRUN_SESSION_TTL_SECONDS, with their history (cascade)."""
    ttl = rt.settings.session_ttl_seconds
    if ttl <= 0:
        return 0
    cutoff = utcnow() - timedelta(seconds=ttl)
    with unit_of_work(rt.sessions, SYSTEM) as db:
        # Idle means no turn running or paused: a turn waiting for the user keeps its session.
        # SKIP LOCKED: a session a request is busy with right now is not idle.
        ids = list(db.scalars(
            select(AgentSession.id)
            .where(AgentSession.active_turn_id.is_(None), AgentSession.updated_at < cutoff)
            .order_by(AgentSession.updated_at).limit(limit)
            .with_for_update(skip_locked=True)
        ))
        if ids:
            db.execute(delete(AgentSession).where(AgentSession.id.in_(ids))
                       .execution_options(synchronize_session=False))
            after_commit(db, lambda: _delete_logs(rt, ids))
    if ids:
        log.info("lifecycle: %d idle sessions deleted", len(ids))
    return len(ids)


def _delete_logs(rt: Runtime, session_ids: list[str]) -> None:
    for session_id in session_ids:
        rt.events.delete(session_id)


def prune_checkpoints(rt: Runtime, limit: int = 10_000) -> int:
    """Keep the latest STEPRUN_CHECKPOINT_KEEP checkpoints per session (a step only ever loads the latest),
    and the rows from the keyframe of the oldest kept one on, so every kept checkpoint reads whole."""
    keep = rt.settings.checkpoint_keep
    if keep <= 0:
        return 0
    heavy = (
        select(Checkpoint.session_id, (func.max(Checkpoint.number) - keep).label("cutoff"))
        .group_by(Checkpoint.session_id)
        .having(func.count() > keep)
        .limit(limit)
    )
    pruned = 0
    with unit_of_work(rt.sessions, SYSTEM) as db:
        for session_id, cutoff in db.execute(heavy).all():
            floor = checkpoints.prune_floor(db, session_id, cutoff)
            pruned += rowcount(db.execute(
                delete(Checkpoint).where(Checkpoint.session_id == session_id, Checkpoint.number < floor)
                .execution_options(synchronize_session=False)))
    if pruned:
        log.info("lifecycle: %d old checkpoints pruned", pruned)
    return pruned


@dataclass
class HousekeepingReport:
    sessions_deleted: int = 0
    checkpoints_pruned: int = 0


def run_housekeeping(rt: Runtime) -> HousekeepingReport:
    """The slow lifecycle jobs (the scheduler runs them every ``lifecycle_interval``)."""
    report = HousekeepingReport(sessions_deleted=expire_idle_sessions(rt), checkpoints_pruned=prune_checkpoints(rt))
    restore = getattr(rt.queue, "restore_unacked", None)
    if restore is not None:  # the Celery queue; the embedded one has nothing to strand
        restore()
    return report
