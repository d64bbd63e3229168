"""Sessions and turns as a client sees them: create, read, list, cancel, resume, roll back.

Service functions take the database session first and never commit: the edge
(an API request, a CLI command) commits once. Work that must wait for the
commit (enqueueing a step, publishing an event) is registered with
:func:`shared.db.after_commit`. Every query is scoped to the principal; every
status change goes through :mod:`shared.turns.transitions`.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import ColumnDefault, bindparam, delete, func, insert, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from shared.auth.principal import SYSTEM, Principal
from shared.clock import utcnow
from shared.db import after_commit, unit_of_work, write_later
from shared.errors import (
    BadInput,
    BudgetExhausted,
    Conflict,
    NotFound,
    QuotaExceeded,
    RateLimited,
    StepRunError,
    TooLarge,
)
from shared.metrics import BUDGET_REJECTIONS
from shared.models import (
    ACTIVE,
    TERMINAL,
    AgentSession,
    Checkpoint,
    Message,
    StreamEvent,
    Turn,
    TurnStatus,
    new_id,
    table_of,
)
from shared.paging import page
from shared.runtime import Runtime
from shared.settings import Settings
from shared.storage import quotas
from shared.turns import budgets, transitions

ON_BUSY = ("enqueue", "reject", "interrupt")
TOOL_OUTCOMES = ("retry", "skip")
MAX_PAGE = 100
# The longest a turn may be delayed (after_seconds / at), and how far in the past `at` may be (clock skew).
MAX_DELAY_SECONDS = 366 * 86400
AT_PAST_SLACK_SECONDS = 300


# --- sessions ---------------------------------------------------------------

def create_session(db: Session, rt: Runtime, who: Principal, agent: Any, metadata: Any) -> AgentSession:
    if not isinstance(agent, str) or not agent:
        raise BadInput("'agent' is required and must be a string naming an agent", field="agent")
    if rt.agents.get(agent) is None:
        known = ", ".join(a.name for a in rt.agents)
        raise BadInput(f"unknown agent {agent!r}; this deployment serves: {known}", field="agent")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise BadInput("'metadata' must be a JSON object", field="metadata")
    if len(json.dumps(metadata)) > rt.settings.max_metadata_bytes:
        raise TooLarge(f"'metadata' is larger than {rt.settings.max_metadata_bytes} bytes", field="metadata")
    row = AgentSession(tenant_id=who.tenant_id, user_id=who.user_id, agent=agent, metadata_=metadata)
    db.add(row)
    db.flush()
    return row


# Reads by id of the principal's own rows, built once (a statement built per call costs more than its round trip).
_SESSION_BY_ID = select(AgentSession).where(AgentSession.id == bindparam("b_id"),
                                            AgentSession.tenant_id == bindparam("b_tenant"),
                                            AgentSession.user_id == bindparam("b_user"))
_SESSION_BY_ID_LOCKED = _SESSION_BY_ID.with_for_update()
_TURN_BY_ID = select(Turn).where(Turn.id == bindparam("b_id"), Turn.tenant_id == bindparam("b_tenant"),
                                 Turn.user_id == bindparam("b_user"))
_TURN_BY_ID_LOCKED = _TURN_BY_ID.with_for_update()


def get_session(db: Session, who: Principal, session_id: str, *, lock: bool = False) -> AgentSession:
    query = _SESSION_BY_ID_LOCKED if lock else _SESSION_BY_ID
    row = db.scalars(query, {"b_id": session_id, "b_tenant": who.tenant_id, "b_user": who.user_id}).first()
    if row is None:
        raise NotFound(f"no session {session_id!r}")
    return row


def list_sessions(db: Session, who: Principal, limit: int, after: str | None) -> tuple[list[AgentSession], str | None]:
    query = select(AgentSession).where(
        AgentSession.tenant_id == who.tenant_id, AgentSession.user_id == who.user_id
    )
    if after:
        anchor = db.scalars(query.where(AgentSession.id == after)).first()
        if anchor is None:
            raise BadInput(f"'after' {after!r} is not a session of yours", field="after")
        query = query.where(
            (AgentSession.created_at < anchor.created_at)
            | ((AgentSession.created_at == anchor.created_at) & (AgentSession.id < anchor.id))
        )
    rows = db.scalars(query.order_by(AgentSession.created_at.desc(), AgentSession.id.desc()).limit(limit + 1))
    return page(rows, limit, lambda row: row.id)


def delete_session(db: Session, rt: Runtime, who: Principal, session_id: str) -> None:
    row = get_session(db, who, session_id, lock=True)
    running = db.scalars(
        select(Turn.id).where(Turn.session_id == row.id, Turn.status.in_(ACTIVE))
    ).all()
    for turn_id in running:
        after_commit(db, partial(rt.events.request_cancel, turn_id))
    db.delete(row)
    after_commit(db, lambda: rt.events.delete(session_id))


def list_messages(db: Session, who: Principal, session_id: str, limit: int,
                  after: int) -> tuple[list[Message], int | None]:
    get_session(db, who, session_id)
    rows = db.scalars(
        select(Message)
        .where(Message.session_id == session_id, Message.tenant_id == who.tenant_id,
               Message.user_id == who.user_id, Message.id > after)
        .order_by(Message.id)
        .limit(limit + 1)
    )
    return page(rows, limit, lambda row: row.id)


# --- turns ------------------------------------------------------------------

def create_turn(
    db: Session,
    rt: Runtime,
    who: Principal,
    session_id: str,
    user_input: Any,
    on_busy: Any = None,
    idempotency_key: str | None = None,
    after_seconds: Any = None,
    at: Any = None,
) -> tuple[Turn, bool]:
    """Start a turn, or queue it behind the active one. Returns (turn, created).

    With ``after_seconds`` or ``at`` the turn is delayed: it stays ``queued`` with
    ``scheduled_at``, not taking the session, until the scheduler starts it then.
    """
    scheduled_at = delay_until(after_seconds, at)
    if scheduled_at is not None and on_busy not in (None, "enqueue"):
        raise BadInput("a delayed turn takes its place when it is due: 'on_busy' must be enqueue", field="on_busy")
    if not isinstance(user_input, str) or not user_input.strip():
        raise BadInput("'input' is required and must be a non-empty string", field="input")
    if len(user_input) > rt.settings.max_input_chars:
        raise TooLarge(f"'input' is longer than {rt.settings.max_input_chars} characters", field="input")
    on_busy = on_busy or "enqueue"
    if on_busy not in ON_BUSY:
        raise BadInput(f"'on_busy' must be one of {', '.join(ON_BUSY)}", field="on_busy")
    if idempotency_key is not None and not (0 < len(idempotency_key) <= 256):
        raise BadInput("Idempotency-Key must be 1 to 256 characters", field="Idempotency-Key")

    input_bytes = len(user_input.encode())
    # A spent token budget, on the system path, before this transaction takes its connection (so a
    # request never holds one connection while it waits for a second); nothing runs when none is set.
    # A repeated Idempotency-Key still gets its turn back, whatever the limits say now.
    refused = admission_refusal(rt, who, input_bytes)
    if idempotency_key:
        existing = _turn_by_idempotency_key(db, who, idempotency_key)
        if existing is not None:
            return _same_request(existing, session_id, user_input), False
    if refused is not None:
        raise refused
    if not idempotency_key and on_busy != "interrupt" and _untouched(db, session_id):
        return _start_turn(db, rt, who, session_id, user_input, on_busy, scheduled_at, input_bytes), True
    # The session row lock serialises concurrent turn requests: one active turn per session.
    session = get_session(db, who, session_id, lock=True)
    _admit(db, rt.settings, who, session, on_busy, input_bytes)
    busy = session.active_turn_id is not None
    session.turn_count += 1
    session.input_bytes = (session.input_bytes or 0) + input_bytes  # the history quota's count
    turn = Turn(
        id=new_id("turn"),  # known before the flush: what the commit does with it is set up first
        session_id=session.id,
        tenant_id=who.tenant_id,
        user_id=who.user_id,
        seq=session.turn_count,
        input=user_input,
        on_busy=on_busy,
        idempotency_key=idempotency_key,
        scheduled_at=scheduled_at,
    )
    queued_event: dict[str, Any] = {"input": user_input}
    if scheduled_at is not None:
        queued_event["scheduled_at"] = scheduled_at.isoformat().replace("+00:00", "Z")
    session.updated_at = utcnow()
    # A delayed turn is not the session's turn until it is due: the scheduler activates it then
    # (shared/schedules/firing.py).
    starts_now = scheduled_at is None and not busy
    if not idempotency_key:
        # Nothing to race on: no savepoint (two round trips) to fall back to. Its event and its activation
        # come before the one flush (turn.queued is published before the step is sent, as always), which
        # writes the session's one UPDATE (count, bytes, active turn) and the turn's INSERT.
        transitions.publish_after_commit(db, rt, session, [("turn.queued", turn.id, queued_event)])
        if starts_now:
            transitions.activate(db, rt, session, turn)
        db.add(turn)
        db.flush()
    else:
        try:
            with db.begin_nested():
                db.add(turn)
                db.flush()
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won the race.
            existing = _turn_by_idempotency_key(db, who, idempotency_key)
            if existing is None:
                raise
            return _same_request(existing, session_id, user_input), False
        transitions.publish_after_commit(db, rt, session, [("turn.queued", turn.id, queued_event)])
        if starts_now:
            transitions.activate(db, rt, session, turn)
    if scheduled_at is None and busy and on_busy == "interrupt":
        # "This input, now": everything ahead of it is cancelled, as LangGraph's interrupt
        # cancels a thread's pending runs too. Queued turns go first, so that when the active
        # turn stops, the session passes straight to this one.
        ahead = db.scalars(select(Turn).where(Turn.session_id == session.id, Turn.status == TurnStatus.QUEUED,
                                              Turn.id != turn.id, Turn.id != session.active_turn_id,
                                              Turn.scheduled_at.is_(None))).all()
        for queued in ahead:
            transitions.finish(db, rt, queued, session, TurnStatus.CANCELLED,
                               extra={"reason": f"interrupted by turn {turn.id}"})
        active = db.get(Turn, session.active_turn_id)
        if active is not None:
            transitions.request_cancel(db, rt, active, session)
    return turn, True


def _admit(db: Session, settings: Settings, who: Principal, session: AgentSession, on_busy: str,
           input_bytes: int, used: dict[str, int] | None = None) -> None:
    """Refuse a new turn of ``who`` on ``session`` (its row locked) that a limit or a busy session forbids
    (``used``: :func:`admission_counts`, read after the lock, if the caller has them)."""
    if used is None:
        used = admission_counts(db, settings, who)
    refused = _over_limits(settings, used, input_bytes)
    if refused is not None:
        raise refused
    waiting = used["queued"]
    if waiting >= settings.max_queued_turns:
        raise RateLimited(f"{waiting} turns are already waiting; the limit is {settings.max_queued_turns}",
                          retry_after=5)
    if session.active_turn_id is not None and on_busy == "reject":
        raise Conflict(f"session {session.id} is busy with turn {session.active_turn_id}; "
                       "retry later or send on_busy=enqueue|interrupt")


# The plain new turn (no Idempotency-Key, no interrupt) in Core statements built once: the ORM's load of
# the session row and its unit of work (one UPDATE, one INSERT) cost more CPU than the round trips.
_SESSIONS, _TURNS = table_of(AgentSession), table_of(Turn)
# The columns a new turn reads and may change: what transitions.activate and the event record touch.
_SESSION_FIELDS = ("active_turn_id", "turn_count", "input_bytes", "event_cursor")


def _the_session(table: Any) -> tuple[Any, ...]:
    return (table.c.id == bindparam("b_session"), table.c.tenant_id == bindparam("b_tenant"),
            table.c.user_id == bindparam("b_user"))


# The lock, whose result nobody reads: held, it goes ahead of the read below in the same round trip. The
# read is a statement of its own after it (its own snapshot, taken once the lock is held): the counts of
# a concurrent POST on the session, which held the lock first, are in it. (The read's session is an alias:
# the counts' subqueries over sessions stay their own.)
_LOCK_SESSION = select(_SESSIONS.c.id).where(*_the_session(_SESSIONS)).with_for_update()
_THE_SESSION = _SESSIONS.alias("the_session")
_SESSION_COLUMNS = [_THE_SESSION.c[name].label(f"s_{name}")
                    for name in ("id", "tenant_id", "user_id", *_SESSION_FIELDS)]
# SET takes the columns the parameters name.
_WRITE_SESSION = update(_SESSIONS).where(_SESSIONS.c.id == bindparam("b_session"))
_INSERT_TURN = insert(_TURNS)


def _untouched(db: Session, session_id: str) -> bool:
    """Whether ``db`` holds nothing of its own yet for the session: no loaded row to keep in step, no
    pending change to order the new turn's writes after (a caller that loaded the session first gets the
    ORM path)."""
    return (not db.new and not db.dirty and not db.deleted
            and identity_key(AgentSession, session_id) not in db.identity_map)


def _start_turn(db: Session, rt: Runtime, who: Principal, session_id: str, user_input: str, on_busy: str,
                scheduled_at: datetime | None, input_bytes: int) -> Turn:
    """:func:`create_turn`'s plain case: the same checks, rows and after-commit work, in Core statements.

    The session and the turn are transient ORM objects here, so that :mod:`shared.turns.transitions` works
    on them as on loaded ones; what it changes is written with the turn's INSERT (one statement on Postgres).
    """
    the_session = {"b_session": session_id, "b_tenant": who.tenant_id, "b_user": who.user_id}
    write_later(db, _LOCK_SESSION, the_session)
    row = db.execute(_session_and_admission_query(rt.settings, db.get_bind().dialect.name), the_session).first()
    if row is None:
        raise NotFound(f"no session {session_id!r}")
    fields = row._mapping
    loaded = {name: fields[f"s_{name}"] for name in _SESSION_FIELDS}
    session = AgentSession(id=fields["s_id"], tenant_id=fields["s_tenant_id"], user_id=fields["s_user_id"], **loaded)
    used = {key: int(value) for key, value in fields.items() if not key.startswith("s_") and value is not None}
    _admit(db, rt.settings, who, session, on_busy, input_bytes, used)
    busy = session.active_turn_id is not None
    session.turn_count += 1
    session.input_bytes = (session.input_bytes or 0) + input_bytes  # the history quota's count
    turn = Turn(id=new_id("turn"), session_id=session.id, tenant_id=who.tenant_id, user_id=who.user_id,
                seq=session.turn_count, input=user_input, on_busy=on_busy, idempotency_key=None,
                scheduled_at=scheduled_at)
    queued_event: dict[str, Any] = {"input": user_input}
    if scheduled_at is not None:
        queued_event["scheduled_at"] = scheduled_at.isoformat().replace("+00:00", "Z")
    transitions.publish_after_commit(db, rt, session, [("turn.queued", turn.id, queued_event)])
    if scheduled_at is None and not busy:
        transitions.activate(db, rt, session, turn)
    changes: dict[str, Any] = {name: getattr(session, name) for name in _SESSION_FIELDS
                               if getattr(session, name) != loaded[name]}
    changes["updated_at"] = session.updated_at = utcnow()
    _write_session_and_turn(db, session.id, changes, _turn_values(turn))
    return turn


_session_and_turn_writes: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}


def _write_session_and_turn(db: Session, session_id: str, changes: dict[str, Any], values: dict[str, Any]) -> None:
    """The session's UPDATE and the turn's INSERT: one statement on Postgres (the UPDATE as a data-modifying
    WITH, which runs to completion whether or not the INSERT reads it), two elsewhere."""
    if db.get_bind().dialect.name != "postgresql":
        db.execute(_WRITE_SESSION, {"b_session": session_id, **changes})
        db.execute(_INSERT_TURN, values)
        return
    shape = (tuple(changes), tuple(values))
    statement = _session_and_turn_writes.get(shape)
    kept = statement is not None
    if statement is None:
        # Every parameter named apart from the columns: implicit SET/VALUES keys would leak into the WITH.
        written = (update(_SESSIONS).where(_SESSIONS.c.id == bindparam("b_session"))
                   .values({name: bindparam(f"s_{name}") for name in changes}).cte("written_session"))
        statement = insert(_TURNS).values({name: bindparam(f"t_{name}") for name in values}).add_cte(written)
        if len(_session_and_turn_writes) < 64:  # a handful of shapes (delayed or not, idle or busy)
            _session_and_turn_writes[shape] = statement
            kept = True
    params = {"b_session": session_id}
    params.update((f"s_{name}", value) for name, value in changes.items())
    params.update((f"t_{name}", value) for name, value in values.items())
    if kept:
        write_later(db, statement, params)  # nothing reads its result: it goes with the COMMIT
    else:
        db.execute(statement, params)  # a shape past the cache's bound: not kept for write_later either


def _column_default(column: Any) -> tuple[str, Any, bool, bool]:
    """(key, its Python default, whether that is a function (of a context), whether a NULL needs a parameter)."""
    default = column.default
    value: Any = None
    call = False
    if isinstance(default, ColumnDefault) and (default.is_scalar or default.is_callable):
        # SQLAlchemy wraps a model's function in one that takes an execution context (unused by ours).
        value, call = default.arg, default.is_callable
    # A NULL in a column without a default of its own needs no parameter.
    return column.key, value, call, default is not None or column.server_default is not None


_TURN_DEFAULTS = [_column_default(column) for column in _TURNS.columns]


def _turn_values(turn: Turn) -> dict[str, Any]:
    """Every column of the new ``turn``, its model's Python defaults filled in (on the object too, as a
    flush would: the caller answers with it)."""
    values: dict[str, Any] = {}
    state = turn.__dict__
    for key, default, call, keep_null in _TURN_DEFAULTS:
        if key in state:
            value = state[key]
        else:
            value = default(None) if call else default
            setattr(turn, key, value)
        if value is not None or keep_null:
            values[key] = value
    return values


def delay_until(after_seconds: Any, at: Any) -> datetime | None:
    """When a delayed turn is due, from ``after_seconds`` (>= 0) or ``at`` (RFC 3339 with an offset); None: now."""
    if after_seconds is not None and at is not None:
        raise BadInput("give 'after_seconds' or 'at', not both", field="at")
    now = utcnow()
    if after_seconds is not None:
        if (isinstance(after_seconds, bool) or not isinstance(after_seconds, (int, float))
                or not math.isfinite(after_seconds) or not 0 <= after_seconds <= MAX_DELAY_SECONDS):
            raise BadInput(f"'after_seconds' must be a number from 0 to {MAX_DELAY_SECONDS}", field="after_seconds")
        return now + timedelta(seconds=after_seconds) if after_seconds > 0 else None
    if at is None:
        return None
    if not isinstance(at, str) or len(at) > 64:
        raise BadInput("'at' must be an RFC 3339 time with an offset, e.g. 2030-01-31T09:00:00Z", field="at")
    try:
        when = datetime.fromisoformat(at[:-1] + "+00:00" if at.endswith(("Z", "z")) else at)
    except ValueError:
        raise BadInput(f"'at' is not an RFC 3339 time: {at!r}", field="at") from None
    if when.tzinfo is None:
        raise BadInput("'at' needs an offset (Z or +hh:mm): a time without one is ambiguous", field="at")
    if when < now - timedelta(seconds=AT_PAST_SLACK_SECONDS):
        raise BadInput(f"'at' ({at}) is in the past", field="at")
    if when > now + timedelta(seconds=MAX_DELAY_SECONDS):
        raise BadInput("'at' is more than a year away", field="at")
    return when if when > now else None


def admission_refusal(rt: Runtime, who: Principal, input_bytes: int) -> StepRunError | None:
    """A spent token budget of ``who`` (which adds up every user's spending: one transaction on the system
    path), or None; nothing runs when no token budget is set. The other limits a new turn must fit are
    counted in the turn's own transaction (:func:`admission_counts`)."""
    settings = rt.settings
    if not budgets.token_limits(settings):
        return None
    with unit_of_work(rt.sessions, SYSTEM) as sysdb:
        try:
            budgets.check_tokens_spent(sysdb, settings, who)
        except budgets.BudgetExceeded as over:
            BUDGET_REJECTIONS.inc()
            wait = (over.resets_at - utcnow()).total_seconds() if over.resets_at else 60.0
            return BudgetExhausted(over.message, retry_after=max(1.0, wait))
    return None


def admission_counts(db: Session, settings: Settings, who: Principal) -> dict[str, int]:
    """What a new turn of ``who`` must fit, in one statement of the turn's own transaction: ``queued``
    (the principal's queued turns) and, as the limits are set, ``user_history``, ``tenant_queued`` and
    ``tenant_history``.

    The tenant's totals add up rows of users this scope cannot read: on Postgres they come from
    ``steprun_tenant_admission`` (migration 0021), which counts them for the tenant of the signed scope
    only, so the POST needs no transaction of its own on the system path for them.
    """
    query = _admission_query(settings, db.get_bind().dialect.name)
    row = db.execute(query, {"b_tenant": who.tenant_id, "b_user": who.user_id}).one()
    return {key: int(value) for key, value in row._mapping.items() if value is not None}


_admission_queries: dict[tuple[bool, bool, bool, bool], Any] = {}
_session_and_admission_queries: dict[tuple[bool, bool, bool, bool], Any] = {}


def _session_and_admission_query(settings: Settings, dialect: str) -> Any:
    """The new turn's session (its columns labelled ``s_…``; no row if it is not the principal's) and
    :func:`admission_counts`'s figures, in one statement, built once."""
    shape = _admission_shape(settings, dialect)
    query = _session_and_admission_queries.get(shape)
    if query is None:
        counts = _admission_query(settings, dialect).subquery("admission")  # one row
        query = _session_and_admission_queries[shape] = (
            select(counts, *_SESSION_COLUMNS).select_from(_THE_SESSION.join(counts, true()))
            .where(*_the_session(_THE_SESSION)))
    return query


def _admission_shape(settings: Settings, dialect: str) -> tuple[bool, bool, bool, bool]:
    """What an admission statement depends on: Postgres, and which tenant and history limits are set."""
    return (dialect == "postgresql", settings.max_queued_turns_per_tenant > 0,
            settings.quota_tenant_history_bytes > 0, settings.quota_user_history_bytes > 0)


def _admission_query(settings: Settings, dialect: str) -> Any:
    """:func:`admission_counts`'s statement for these limits, built once (its principal bound at execution)."""
    shape = postgres, tenant_queued, tenant_history, user_history = _admission_shape(settings, dialect)
    query = _admission_queries.get(shape)
    if query is not None:
        return query
    tenant_id: Any = bindparam("b_tenant")
    user_id: Any = bindparam("b_user")
    # Core columns (the tables, not the mapped classes): no ORM compile state at every POST.
    parts: list[Any] = [select(func.count()).select_from(_TURNS)
                        .where(_TURNS.c.tenant_id == tenant_id, _TURNS.c.user_id == user_id,
                               _TURNS.c.status == TurnStatus.QUEUED).scalar_subquery().label("queued")]
    parts += quotas.history_columns(settings, tenant_id, user_id, tenant=False)
    if (tenant_queued or tenant_history) and postgres:
        totals = func.steprun_tenant_admission(tenant_id, tenant_queued, tenant_history).table_valued(
            "tenant_queued", "tenant_history")
        query = select(*parts, totals.c.tenant_queued, totals.c.tenant_history).select_from(totals)
    else:  # SQLite: no row-level security, plain subqueries
        if tenant_queued:
            parts.append(select(func.count()).select_from(_TURNS)
                         .where(_TURNS.c.tenant_id == tenant_id, _TURNS.c.status == TurnStatus.QUEUED)
                         .scalar_subquery().label("tenant_queued"))
        parts += [p for p in quotas.history_columns(settings, tenant_id, user_id) if p.name == "tenant_history"]
        query = select(*parts)
    _admission_queries[shape] = query
    return query


def _over_limits(settings: Settings, used: dict[str, int], input_bytes: int) -> StepRunError | None:
    cap = settings.max_queued_turns_per_tenant
    if cap > 0 and used.get("tenant_queued", 0) >= cap:
        return RateLimited(f"{used['tenant_queued']} turns of your tenant are already waiting; the limit is {cap} "
                           "(STEPRUN_MAX_QUEUED_TURNS_PER_TENANT)", retry_after=5)
    try:
        quotas.check_history(settings, used, input_bytes)
    except QuotaExceeded as full:
        return full
    return None


def _turn_by_idempotency_key(db: Session, who: Principal, key: str) -> Turn | None:
    return db.scalars(
        select(Turn).where(Turn.tenant_id == who.tenant_id, Turn.user_id == who.user_id,
                           Turn.idempotency_key == key)
    ).first()


def _same_request(turn: Turn, session_id: str, user_input: str) -> Turn:
    if turn.session_id != session_id or turn.input != user_input:
        raise Conflict("this Idempotency-Key was already used for a different request", field="Idempotency-Key")
    return turn


def get_turn(db: Session, who: Principal, turn_id: str, *, lock: bool = False) -> Turn:
    query = _TURN_BY_ID_LOCKED if lock else _TURN_BY_ID
    row = db.scalars(query, {"b_id": turn_id, "b_tenant": who.tenant_id, "b_user": who.user_id}).first()
    if row is None:
        raise NotFound(f"no turn {turn_id!r}")
    return row


def cancel_turn(db: Session, rt: Runtime, who: Principal, turn_id: str) -> Turn:
    """Cancel a turn. Idempotent: cancelling a finished turn returns it unchanged."""
    turn = get_turn(db, who, turn_id)
    if turn.status in TERMINAL:
        return turn
    session = get_session(db, who, turn.session_id, lock=True)
    db.refresh(turn, with_for_update=True)
    if turn.status not in TERMINAL:
        transitions.request_cancel(db, rt, turn, session)
    return turn


def rollback_turn(db: Session, rt: Runtime, who: Principal, turn_id: str, reason: str = "rolled back") -> bool:
    """Cancel a turn and delete it with everything it wrote, as if it never ran (LangGraph's rollback).

    Its messages, checkpoints, kept events, spans and journal go with it; the tokens it
    spent stay counted against budgets. A finished turn is left as it is (False).
    """
    turn = get_turn(db, who, turn_id)
    if turn.status in TERMINAL:
        return False
    session = get_session(db, who, turn.session_id, lock=True)  # session, then turn: the usual lock order
    db.refresh(turn, with_for_update=True)
    if turn.status in TERMINAL:
        return False  # it finished while we waited for the lock
    _roll_back(db, rt, session, turn, reason)
    return True


def rollback_session(db: Session, rt: Runtime, who: Principal, session_id: str, reason: str) -> list[str]:
    """Roll back the session's active turn and the turns waiting behind it; the ids rolled back.

    Delayed turns (``scheduled_at``) are kept, as ``on_busy=interrupt`` keeps them.
    The session is left idle, so a turn created next in this transaction starts at once.
    """
    session = get_session(db, who, session_id, lock=True)
    waiting = db.scalars(select(Turn).where(Turn.session_id == session.id, Turn.status == TurnStatus.QUEUED,
                                            Turn.scheduled_at.is_(None), Turn.id != session.active_turn_id)
                         .order_by(Turn.seq).with_for_update()).all()
    active = None
    if session.active_turn_id is not None:
        active = db.scalars(select(Turn).where(Turn.id == session.active_turn_id).with_for_update()).first()
    # The waiting ones first: ending the active turn would hand the session to one of them.
    doomed = [*waiting, *([active] if active is not None and active.status not in TERMINAL else [])]
    for turn in doomed:
        _roll_back(db, rt, session, turn, reason)
    return [t.id for t in doomed]


def _roll_back(db: Session, rt: Runtime, session: AgentSession, turn: Turn, reason: str) -> None:
    """End ``turn`` (its session and turn rows locked) and delete what it wrote, then the turn itself."""
    # Every statement runs as the caller's principal: row-level security scopes these deletes too.
    # Kept events first: the turn.cancelled that transitions.roll_back writes must stay, since it is
    # what tells the turn's watchers it is over.
    db.execute(delete(StreamEvent).where(StreamEvent.session_id == session.id, StreamEvent.turn_id == turn.id)
               .execution_options(synchronize_session=False))
    transitions.roll_back(db, rt, turn, session, reason)
    session.input_bytes = max(0, (session.input_bytes or 0) - len(turn.input.encode()))
    db.flush()
    for model in (Message, Checkpoint):
        db.execute(delete(model).where(model.session_id == session.id, model.turn_id == turn.id)
                   .execution_options(synchronize_session=False))
    # Its spans, model and tool call journal go by ON DELETE CASCADE; a running step's
    # heartbeat, journal writes and fenced commit find no turn row and stop as a zombie.
    db.delete(turn)
    db.flush()


def resume_turn(db: Session, rt: Runtime, who: Principal, turn_id: str, body: dict[str, Any]) -> Turn:
    """Continue a paused turn with the user's answer."""
    turn = get_turn(db, who, turn_id)
    get_session(db, who, turn.session_id, lock=True)  # the same lock order as every other turn change
    db.refresh(turn, with_for_update=True)
    if turn.status != TurnStatus.REQUIRES_ACTION:
        raise Conflict(f"turn {turn_id} is {turn.status}, not requires_action")
    approve, text, outputs = body.get("approve"), body.get("input"), body.get("tool_outputs")
    if approve is not None and not isinstance(approve, bool):
        raise BadInput("'approve' must be true or false", field="approve")
    if text is not None and (not isinstance(text, str) or len(text) > rt.settings.max_input_chars):
        raise BadInput(f"'input' must be a string of at most {rt.settings.max_input_chars} characters",
                       field="input")
    if outputs is not None and not (
        isinstance(outputs, list)
        and all(isinstance(o, dict) and isinstance(o.get("id"), str) for o in outputs)
    ):
        raise BadInput("'tool_outputs' must be a list of {id, output} objects", field="tool_outputs")
    outcome = body.get("tool_outcome")
    if outcome is not None and outcome not in TOOL_OUTCOMES:
        raise BadInput("'tool_outcome' must be retry or skip", field="tool_outcome")
    pending = turn.pending or {}
    if pending.get("reason") == "tool_outcome_unknown" and outcome is None:
        answered = {o["id"] for o in outputs or []}
        if not {u["id"] for u in pending.get("unknown") or []} <= answered:
            raise BadInput("this turn waits for a decision on a tool call whose outcome is unknown: send "
                           "'tool_outcome': 'retry' (run it again) or 'skip' (do not), or its output in "
                           "'tool_outputs'", field="tool_outcome")
    if pending.get("reason") == "approval" and approve is None:
        raise BadInput("this turn waits for an approval: send 'approve': true or false", field="approve")
    if (pending.get("reason") == "question" or pending.get("questions")) and text is None:
        raise BadInput("this turn waits for an answer: send 'input'", field="input")
    answer: dict[str, Any] = {"approve": approve, "input": text, "tool_outputs": outputs}
    if outcome is not None:
        answer["tool_outcome"] = outcome
    transitions.resume(db, rt, turn, answer)
    return turn
