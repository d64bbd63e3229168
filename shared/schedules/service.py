"""A principal's schedules: the service functions behind /v1/schedules.

The database session comes first and nothing commits here (the edge does).
Every query is scoped to the principal (row-level security backs it up): another
user's schedule is a 404, never a 403.
"""
from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.auth.principal import Principal, TenantAdmin
from shared.clock import utcnow
from shared.errors import BadInput, Conflict, NotFound, TooLarge
from shared.models import Schedule, Turn
from shared.paging import page
from shared.runtime import Runtime
from shared.schedules.timing import check_cron, check_every, check_timezone, next_run
from shared.turns.service import get_session

MAX_SCHEDULES = 100
CHANGEABLE = ("paused", "cron", "every_seconds", "input", "timezone", "metadata")


def _input(rt: Runtime, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadInput("'input' is required and must be a non-empty string", field="input")
    if len(value) > rt.settings.max_input_chars:
        raise TooLarge(f"'input' is longer than {rt.settings.max_input_chars} characters", field="input")
    return value


def _metadata(rt: Runtime, value: Any) -> dict[str, Any]:
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise BadInput("'metadata' must be a JSON object", field="metadata")
    if len(json.dumps(value)) > rt.settings.max_metadata_bytes:
        raise TooLarge(f"'metadata' is larger than {rt.settings.max_metadata_bytes} bytes", field="metadata")
    return value


def _timing(rt: Runtime, cron: Any, every: Any) -> tuple[str | None, int | None]:
    if (cron is None) == (every is None):
        raise BadInput("give exactly one of 'cron' (5 fields) or 'every_seconds'",
                       field="cron" if cron is not None else "every_seconds")
    if cron is not None:
        return check_cron(cron), None
    return None, check_every(every, rt.settings.schedule_min_seconds)


def create_schedule(db: Session, rt: Runtime, who: Principal, body: dict[str, Any]) -> Schedule:
    agent = body.get("agent")
    if not isinstance(agent, str) or rt.agents.get(agent) is None:
        known = ", ".join(a.name for a in rt.agents)
        raise BadInput(f"'agent' must name an agent this deployment serves: {known}", field="agent")
    user_input = _input(rt, body.get("input"))
    cron, every = _timing(rt, body.get("cron"), body.get("every_seconds"))
    tz = check_timezone(body.get("timezone") or "UTC")
    metadata = _metadata(rt, body.get("metadata"))
    session_id = body.get("session_id")
    if session_id is not None:
        if not isinstance(session_id, str):
            raise BadInput("'session_id' must be a string", field="session_id")
        session = get_session(db, who, session_id)
        if session.agent != agent:
            raise BadInput(f"session {session_id} talks to agent {session.agent!r}, not {agent!r}",
                           field="session_id")
    owned = db.scalar(select(func.count()).select_from(Schedule).where(
        Schedule.tenant_id == who.tenant_id, Schedule.user_id == who.user_id)) or 0
    if owned >= MAX_SCHEDULES:
        raise Conflict(f"you have {owned} schedules, the most allowed; delete one first")
    now = utcnow()
    row = Schedule(tenant_id=who.tenant_id, user_id=who.user_id, agent=agent, input=user_input, cron=cron,
                   every_seconds=every, timezone=tz, session_id=session_id, metadata_=metadata, paused=False,
                   next_run_at=next_run(cron, every, tz, now), run_count=0, created_at=now, updated_at=now)
    db.add(row)
    db.flush()
    return row


def get_schedule(db: Session, who: Principal, schedule_id: str, *, lock: bool = False) -> Schedule:
    query = select(Schedule).where(Schedule.id == schedule_id, Schedule.tenant_id == who.tenant_id,
                                   Schedule.user_id == who.user_id)
    if lock:
        query = query.with_for_update()
    row = db.scalars(query).first()
    if row is None:
        raise NotFound(f"no schedule {schedule_id!r}")
    return row


def list_schedules(db: Session, who: Principal, limit: int, after: str | None) -> tuple[list[Schedule], str | None]:
    query = select(Schedule).where(Schedule.tenant_id == who.tenant_id, Schedule.user_id == who.user_id)
    if after:
        anchor = db.scalars(query.where(Schedule.id == after)).first()
        if anchor is None:
            raise BadInput(f"'after' {after!r} is not a schedule of yours", field="after")
        query = query.where((Schedule.created_at < anchor.created_at)
                            | ((Schedule.created_at == anchor.created_at) & (Schedule.id < anchor.id)))
    rows = db.scalars(query.order_by(Schedule.created_at.desc(), Schedule.id.desc()).limit(limit + 1))
    return page(rows, limit, lambda row: row.id)


def update_schedule(db: Session, rt: Runtime, who: Principal, schedule_id: str, body: dict[str, Any]) -> Schedule:
    """Change ``paused``, the timing, ``input``, ``timezone`` or ``metadata``.

    A new timing, a new time zone or a resume takes effect from now: runs missed
    while paused are not made up.
    """
    unknown = sorted(set(body) - set(CHANGEABLE))
    if unknown:
        raise BadInput(f"{unknown[0]!r} cannot be changed; send any of {', '.join(CHANGEABLE)}", field=unknown[0])
    row = get_schedule(db, who, schedule_id, lock=True)
    retime = False
    if "cron" in body or "every_seconds" in body:
        cron, every = _timing(rt, body.get("cron"), body.get("every_seconds"))
        retime = (cron, every) != (row.cron, row.every_seconds)
        row.cron, row.every_seconds = cron, every
    if "timezone" in body:
        tz = check_timezone(body["timezone"])
        retime = retime or tz != row.timezone
        row.timezone = tz
    if "input" in body:
        row.input = _input(rt, body["input"])
    if "metadata" in body:
        row.metadata_ = _metadata(rt, body["metadata"])
    if "paused" in body:
        if not isinstance(body["paused"], bool):
            raise BadInput("'paused' must be true or false", field="paused")
        retime = retime or (row.paused and not body["paused"])
        row.paused = body["paused"]
    if retime:
        row.next_run_at = next_run(row.cron, row.every_seconds, row.timezone, utcnow())
    row.updated_at = utcnow()
    return row


def delete_schedule(db: Session, who: Principal, schedule_id: str) -> None:
    """Delete the schedule; the turns it started stay, as ordinary turns."""
    db.delete(get_schedule(db, who, schedule_id, lock=True))


def list_runs(db: Session, who: Principal, schedule_id: str, limit: int,
              after: str | None) -> tuple[list[Turn], str | None]:
    """The turns the schedule started, newest first."""
    get_schedule(db, who, schedule_id)
    query = select(Turn).where(Turn.schedule_id == schedule_id, Turn.tenant_id == who.tenant_id,
                               Turn.user_id == who.user_id)
    if after:
        anchor = db.scalars(query.where(Turn.id == after)).first()
        if anchor is None:
            raise BadInput(f"'after' {after!r} is not a run of this schedule", field="after")
        query = query.where((Turn.created_at < anchor.created_at)
                            | ((Turn.created_at == anchor.created_at) & (Turn.id < anchor.id)))
    rows = db.scalars(query.order_by(Turn.created_at.desc(), Turn.id.desc()).limit(limit + 1))
    return page(rows, limit, lambda row: row.id)


def tenant_schedules(db: Session, admin: TenantAdmin, limit: int = 200) -> list[Schedule]:
    """Every user's schedules of one tenant, newest first: the console's read (migration 0012's policy).

    The query names the tenant as well, so the embedded SQLite file (no row-level security) keeps to it too.
    """
    query = (select(Schedule).where(Schedule.tenant_id == admin.tenant_id)
             .order_by(Schedule.created_at.desc(), Schedule.id.desc()).limit(limit))
    return list(db.scalars(query))
