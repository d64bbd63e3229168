"""The scheduler's job for turns that start themselves: due schedules and due delayed turns.

Exactly once, with any number of schedulers: a schedule is fired in one
transaction of its owner that locks its row (``FOR UPDATE SKIP LOCKED``: a
second scheduler skips it), re-checks that it is due and not paused, advances
``next_run_at`` past now and creates the run's turn. Either all of that commits
or none of it; a scheduler that comes back after a gap fires a missed run once,
since ``next_run_at`` moves past *now*, not one period on. The run's turn also
carries an idempotency key naming the schedule and the slot, so even a second
firing of the same slot could not make a second turn.

A delayed turn waits ``queued`` without taking its session; once due, it is
handed the session (under the session's row lock, like every turn change) if
the session is idle, or runs after the active turn like any queued one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.auth.principal import SYSTEM, Principal
from shared.clock import aware, utcnow
from shared.db import unit_of_work
from shared.errors import StepRunError
from shared.models import AgentSession, Schedule, Turn, TurnStatus
from shared.runtime import Runtime
from shared.schedules.timing import next_run
from shared.turns import transitions
from shared.turns.service import create_session, create_turn

log = logging.getLogger(__name__)
BATCH = 200


@dataclass
class FiringReport:
    schedules_fired: int = 0
    schedules_skipped: int = 0
    delayed_started: int = 0

    def __bool__(self) -> bool:
        return bool(self.schedules_fired or self.schedules_skipped or self.delayed_started)

    def __str__(self) -> str:
        return (f"{self.schedules_fired} scheduled runs started, {self.schedules_skipped} skipped, "
                f"{self.delayed_started} delayed turns started")


def _fire_one(db: Session, rt: Runtime, who: Principal, schedule_id: str) -> bool | None:
    """Fire one schedule if it is still due: True (a turn started), False (skipped, error kept), None (not due)."""
    now = utcnow()
    row = db.scalars(select(Schedule).where(Schedule.id == schedule_id).with_for_update(skip_locked=True)).first()
    if row is None or row.paused or aware(row.next_run_at) > now:
        return None  # another scheduler holds or fired it, or it was paused or deleted meanwhile
    slot = aware(row.next_run_at)
    row.next_run_at = next_run(row.cron, row.every_seconds, row.timezone, now, previous=slot)
    row.last_run_at = now
    try:
        with db.begin_nested():
            session_id = row.session_id or create_session(db, rt, who, row.agent, {"schedule_id": row.id}).id
            turn, _ = create_turn(db, rt, who, session_id, row.input,
                                  idempotency_key=f"schedule:{row.id}:{int(slot.timestamp())}")
            turn.schedule_id = row.id
            db.flush()
    except StepRunError as exc:
        # The run is skipped, not retried: the next one comes at its time. The schedule says why.
        row.last_error = {"code": exc.code, "message": exc.message,
                          "at": now.isoformat().replace("+00:00", "Z")}
        log.warning("schedule %s: run at %s skipped: %s", row.id, slot.isoformat(), exc.message)
        return False
    row.run_count += 1
    row.last_error = None
    log.info("schedule %s: run at %s started turn %s", row.id, slot.isoformat(), turn.id)
    return True


def fire_due_schedules(rt: Runtime, report: FiringReport, limit: int = BATCH) -> None:
    now = utcnow()
    with unit_of_work(rt.sessions, SYSTEM) as db:
        due = db.execute(select(Schedule.id, Schedule.tenant_id, Schedule.user_id)
                         .where(Schedule.paused.is_(False), Schedule.next_run_at <= now)
                         .order_by(Schedule.next_run_at).limit(limit)).all()
    for schedule_id, tenant_id, user_id in due:
        who = Principal(tenant_id, user_id)
        try:
            with unit_of_work(rt.sessions, who) as db:  # the run is the owner's turn, under the owner's RLS
                fired = _fire_one(db, rt, who, schedule_id)
        except Exception:  # noqa: BLE001 - one broken schedule must not stop the others; it is retried next poll
            log.exception("schedule %s: firing failed", schedule_id)
            continue
        if fired:
            report.schedules_fired += 1
        elif fired is False:
            report.schedules_skipped += 1


def start_due_delayed_turns(rt: Runtime, report: FiringReport, limit: int = BATCH) -> None:
    now = utcnow()
    with unit_of_work(rt.sessions, SYSTEM) as db:
        due = db.execute(
            select(AgentSession.id, AgentSession.tenant_id, AgentSession.user_id).distinct()
            .join(Turn, Turn.session_id == AgentSession.id)
            .where(Turn.status == TurnStatus.QUEUED, Turn.scheduled_at <= now, AgentSession.active_turn_id.is_(None))
            .limit(limit)).all()
    for session_id, tenant_id, user_id in due:
        with unit_of_work(rt.sessions, Principal(tenant_id, user_id)) as db:
            session = db.scalars(select(AgentSession).where(AgentSession.id == session_id)
                                 .with_for_update(skip_locked=True)).first()
            if session is None or session.active_turn_id is not None:
                continue  # busy meanwhile: the due turn runs when the active one ends
            if transitions.activate_next(db, rt, session) is not None:
                report.delayed_started += 1


def fire_due(rt: Runtime) -> FiringReport:
    """One round: start due delayed turns, then fire due schedules."""
    report = FiringReport()
    start_due_delayed_turns(rt, report)
    fire_due_schedules(rt, report)
    return report
