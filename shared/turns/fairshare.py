"""Fair share of the workers: a cap on the turns one user, and one tenant, run at once.

A turn starts running at its first claim (``queued`` → ``in_progress``). If its
user (``STEPRUN_MAX_RUNNING_TURNS_PER_USER``) or tenant
(``STEPRUN_MAX_RUNNING_TURNS_PER_TENANT``) already runs that many turns, the
worker does not claim it but *defers* it (:func:`first_claim`, :func:`defer_over_cap`): the turn stays its
session's active turn, ``queued``, with no task in flight (``enqueued_at`` NULL).
No attempt is spent, no worker waits, no sweep re-sends it.

When a running turn stops running (it ends or pauses), :func:`slot_freed` marks
the oldest deferred turns of its user that now fit as sent, in that same
transaction, and sends them once it commits (with the tenant cap on, a thread
does it on the system path right after the commit, since other users' turns are
out of the transaction's scope); the scheduler's sweep (:func:`wake_deferred`)
does the same for a slot freed any other way (a session deleted mid-turn). The
worker's claim re-checks the caps, so a turn woken once too often is only
deferred again.

The running count is of ``in_progress`` turns: a turn between two steps still
holds its slot, a paused turn (``requires_action``) holds none, and its resume is
not held back (so a user may briefly run more than the cap). On Postgres the
count and the decision are serialised per user (per tenant, when the tenant cap
is on) by a transaction-scoped advisory lock, which the wake-up takes too; on
SQLite (one process) they are best effort.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    ScalarSelect,
    Select,
    and_,
    bindparam,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.orm import Session

from shared.auth.principal import SYSTEM
from shared.clock import utcnow
from shared.db import after_commit, unit_of_work, write_later
from shared.metrics import TURNS_DEFERRED
from shared.models import AgentSession, Turn, TurnStatus, table_of
from shared.runtime import Runtime
from shared.settings import Settings

log = logging.getLogger(__name__)
# The most deferred turns one sweep round looks at.
SWEEP_BATCH = 200


def caps_on(settings: Settings) -> bool:
    return settings.max_running_turns_per_user > 0 or settings.max_running_turns_per_tenant > 0


def _active_turn() -> ScalarSelect[Any]:
    return select(AgentSession.active_turn_id).where(AgentSession.id == Turn.session_id).scalar_subquery()


def _deferred() -> list[ColumnElement[bool]]:
    """A deferred turn: its session's active turn, queued, not leased, and no task sent (enqueued_at NULL)."""
    return [Turn.status == TurnStatus.QUEUED, Turn.enqueued_at.is_(None), Turn.lease_expires_at.is_(None),
            Turn.id == _active_turn()]


# The lock's key is its name hashed by Postgres (``hashtext``), so the admission can name it from the turn's
# row in SQL (:data:`_LOCK_TURN_OWNER`), with no read of the row first; every other taker passes the same name.
_NAME_PREFIX = "steprun:running:"


def _name(settings: Settings, tenant_id: str, user_id: str) -> str:
    return f"{_NAME_PREFIX}{tenant_id}" if settings.max_running_turns_per_tenant > 0 else \
        f"{_NAME_PREFIX}{tenant_id}:{user_id}"


def _lock(db: Session, settings: Settings, tenant_id: str, user_id: str) -> bool:
    """Serialise the count and the decision per tenant (tenant cap on) or per user (Postgres only).

    What it serialises is this transaction's next statements (the count, the candidates): the lock goes
    ahead of the next one, in its round trip. A transaction that holds turn rows (a turn ending, or being
    rolled back) must not wait for it (a claim holds it while it waits for the turn's row, and the two would
    deadlock): a turn's end only tries it (:func:`slot_freed`).
    """
    if db.get_bind().dialect.name == "postgresql":
        write_later(db, _LOCK, {"name": _name(settings, tenant_id, user_id)})
    return True


def over_cap(settings: Settings, user_running: int, tenant_running: int) -> tuple[str, str] | None:
    """Which cap a new turn would pass ("user" or "tenant") and a phrase for the log; None if it fits."""
    user_cap, tenant_cap = settings.max_running_turns_per_user, settings.max_running_turns_per_tenant
    if user_cap > 0 and user_running >= user_cap:
        return "user", f"its user runs {user_running} turns (STEPRUN_MAX_RUNNING_TURNS_PER_USER={user_cap})"
    if tenant_cap > 0 and tenant_running >= tenant_cap:
        return "tenant", f"its tenant runs {tenant_running} turns (STEPRUN_MAX_RUNNING_TURNS_PER_TENANT={tenant_cap})"
    return None


_turns, _sessions = table_of(Turn), table_of(AgentSession)
# The admission's statements, built once (no per-call construction or cache key).
_ACTIVE = select(_sessions.c.active_turn_id).where(_sessions.c.id == _turns.c.session_id).scalar_subquery()
_running = _turns.alias("running")
_of_owner = (_running.c.status == TurnStatus.IN_PROGRESS, _running.c.tenant_id == _turns.c.tenant_id)
# The admission's read: the turn (if it is its session's active one), and its owner's running turns (its
# tenant's too with the tenant cap), counted by the same statement; on Postgres it comes after the lock.
_USER_RUNNING = select(func.count()).where(*_of_owner, _running.c.user_id == _turns.c.user_id).scalar_subquery()
_TENANT_RUNNING = select(func.count()).where(*_of_owner).scalar_subquery()
_ADMIT = {tenant_wide: select(_turns.c.status, _USER_RUNNING, _TENANT_RUNNING if tenant_wide else literal(0))
          .where(_turns.c.id == bindparam("turn_id"), _turns.c.id == _ACTIVE) for tenant_wide in (False, True)}
# The lock of the turn's owner, named from its row (the same name as :func:`_name`'s): taken ahead of the
# admission's read, in its round trip, so that read's snapshot is taken once the lock is held.
_LOCK_TURN_OWNER = {
    tenant_wide: text("SELECT pg_advisory_xact_lock(hashtext(:prefix || tenant_id"
                      + ("" if tenant_wide else " || ':' || user_id") + ")) FROM turns WHERE id = :turn_id")
    .bindparams(prefix=_NAME_PREFIX)
    for tenant_wide in (False, True)}
_DEFER = (update(_turns)
          .where(_turns.c.id == bindparam("turn_id"), _turns.c.status == TurnStatus.QUEUED, _turns.c.step_count == 0,
                 or_(_turns.c.lease_expires_at.is_(None),
                     _turns.c.lease_expires_at < bindparam("now", type_=_turns.c.lease_expires_at.type)),
                 _turns.c.id == _ACTIVE)
          .values(enqueued_at=None, lease_owner=None, lease_expires_at=None))


# What a turn's first claim requires of the caps, in the claim's own UPDATE (shared/engine/claim.py), per
# (user cap on, tenant cap on): the turn not queued (a retried first step keeps the slot it has), or its owner
# under each cap that is on. The caps are parameters; the counts are the admission read's, taken by the UPDATE
# once the owner's lock (ahead of it, in its round trip) is held.
_UNDER_CAPS: dict[tuple[bool, bool], ColumnElement[bool]] = {
    (user_on, tenant_on): or_(_turns.c.status != TurnStatus.QUEUED, and_(
        *([_USER_RUNNING < bindparam("user_cap")] if user_on else []),
        *([_TENANT_RUNNING < bindparam("tenant_cap")] if tenant_on else [])))
    for user_on, tenant_on in ((True, False), (False, True), (True, True))}


@dataclass(frozen=True)
class FirstClaim:
    """What a turn's first claim must require of the fair share (:func:`first_claim`)."""

    shape: tuple[bool, bool]  # (user cap on, tenant cap on): which condition, built once
    condition: ColumnElement[bool]
    params: dict[str, int]


def first_claim(db: Session, settings: Settings, turn_id: str, step: int) -> FirstClaim | None:
    """Before a turn's first claim (``db`` in the SYSTEM scope): the owner's lock, taken ahead of the claim's
    UPDATE in its round trip, and the condition that UPDATE adds (its owner under the caps). None: no cap
    applies (no cap on, or a later step: a running turn's later steps and retried attempts keep the slot).

    A claim that claims nothing under it asks :func:`defer_over_cap` whether the cap was why.
    """
    if step != 0 or not caps_on(settings):
        return None
    tenant_wide = settings.max_running_turns_per_tenant > 0
    if db.get_bind().dialect.name == "postgresql":
        write_later(db, _LOCK_TURN_OWNER[tenant_wide], {"turn_id": turn_id})
    shape = (settings.max_running_turns_per_user > 0, tenant_wide)
    return FirstClaim(shape, _UNDER_CAPS[shape], {"user_cap": settings.max_running_turns_per_user,
                                                  "tenant_cap": settings.max_running_turns_per_tenant})


def defer_over_cap(db: Session, settings: Settings, turn_id: str) -> bool | None:
    """After a first claim that claimed nothing (its owner's lock held), a read of the turn and its owner's
    counts: True if the owner is over a cap, the turn now deferred (it waits for a slot, queued, with no task
    in flight); None if it is not a queued turn of its session (nothing to claim); False if it fits now.

    False is a running turn of the owner that ended after the claim's UPDATE took its snapshot (and before
    this read took its own): the caller claims again, without the condition. Nothing can have raised the
    count since this read, as every claim of the owner waits for the lock this transaction holds.
    """
    tenant_wide = settings.max_running_turns_per_tenant > 0
    row = db.execute(_ADMIT[tenant_wide], {"turn_id": turn_id}).first()
    if row is None or row[0] != TurnStatus.QUEUED:
        return None
    over = over_cap(settings, int(row[1]), int(row[2]) if tenant_wide else 0)
    if over is None:
        return False
    cap, why = over
    db.execute(_DEFER, {"turn_id": turn_id, "now": utcnow()})
    log.info("turn %s: deferred, %s; it starts when a slot frees", turn_id, why)
    after_commit(db, lambda: TURNS_DEFERRED.labels(cap=cap).inc())
    return True


def slot_freed(db: Session, rt: Runtime, tenant_id: str, user_id: str) -> None:
    """A turn of (tenant, user) stopped running in this transaction (its new status is set): wake who may run.

    With only the user cap, in this transaction (it sees the user's own rows whatever its scope): one
    lock and one UPDATE, the tasks sent after the commit. With the tenant cap, the tenant's other users'
    turns are out of this scope's sight: a thread wakes them on the system path once this commits,
    holding no connection of this transaction while it waits for its own.
    """
    if not caps_on(rt.settings):
        return
    if rt.settings.max_running_turns_per_tenant <= 0:
        conn = db.connection()
        if conn.dialect.name != "postgresql":
            _wake_in(db, rt, tenant_id, user_id, locked=True)
            return
        # The user's lock, if free now, and the user's deferred turns read once it is held, in one round
        # trip (prebuilt statements, no ORM execution: the step's commit runs them at every turn's end).
        write_later(db, _TRY_LOCK_NOTED, {"name": f"{_NAME_PREFIX}{tenant_id}:{user_id}"})
        locked, waiting = conn.execute(_USER_WAITING_IF_LOCKED, {"p_tenant": tenant_id, "p_user": user_id}).one()
        if locked:
            _wake_chosen(db, rt, tenant_id, [(turn_id, user_id) for turn_id in waiting or ()])
            return
    # The tenant cap, or a claim of this user's holds the lock: wake them once this commits.
    after_commit(db, lambda: threading.Thread(target=_wake_quietly, args=(rt, tenant_id, user_id),
                                              name="steprun-fairshare-wake", daemon=True).start())


_LOCK = text("SELECT pg_advisory_xact_lock(hashtext(:name))")
# The try-lock at a turn's end, its answer kept in a transaction-local setting for the next statement (the
# read of the deferred turns) to return: that read's snapshot is taken once the lock is held.
_TRY_LOCK_NOTED = text("SELECT set_config('steprun.fair_share_locked', "
                       "pg_try_advisory_xact_lock(hashtext(:name))::text, true)")
_LOCKED = literal_column("current_setting('steprun.fair_share_locked', true) = 'true'", Boolean)


def _wake_quietly(rt: Runtime, tenant_id: str, user_id: str) -> None:
    try:
        wake(rt, tenant_id, user_id)
    except Exception:  # noqa: BLE001 - the sweep wakes what this could not
        log.warning("waking the deferred turns of tenant %s failed; the sweep will", tenant_id, exc_info=True)


def wake(rt: Runtime, tenant_id: str, user_id: str) -> int:
    """Send the oldest deferred turns of the user (of the tenant, with the tenant cap) that fit; how many."""
    with unit_of_work(rt.sessions, SYSTEM) as db:
        return _wake_in(db, rt, tenant_id, user_id)


def _wake_in(db: Session, rt: Runtime, tenant_id: str, user_id: str, *, locked: bool = False) -> int:
    settings = rt.settings
    if not locked:
        _lock(db, settings, tenant_id, user_id)
    tenant_wide = settings.max_running_turns_per_tenant > 0
    candidates = db.connection().execute(_TENANT_CANDIDATES if tenant_wide else _USER_CANDIDATES,
                                         {"p_tenant": tenant_id, "p_user": user_id}).all()
    return _wake_chosen(db, rt, tenant_id, [(c.id, c.user_id) for c in candidates])


def _wake_chosen(db: Session, rt: Runtime, tenant_id: str, candidates: list[tuple[str, str]]) -> int:
    """Send those of ``candidates`` (the oldest deferred turns, oldest first) that fit under the caps."""
    if not candidates:
        return 0
    settings = rt.settings
    tenant_wide = settings.max_running_turns_per_tenant > 0
    owners = {owner for _, owner in candidates}
    per_user = Counter({owner: int(n) for owner, n in db.execute(
        select(Turn.user_id, func.count()).where(Turn.status == TurnStatus.IN_PROGRESS, Turn.tenant_id == tenant_id,
                                                 Turn.user_id.in_(owners))
        .group_by(Turn.user_id)).all()})
    tenant_running = (db.scalar(select(func.count()).where(
        Turn.status == TurnStatus.IN_PROGRESS, Turn.tenant_id == tenant_id)) or 0) if tenant_wide else 0
    chosen: list[str] = []
    for turn_id, owner in candidates:
        if over_cap(settings, per_user[owner], tenant_running) is None:
            chosen.append(turn_id)
            per_user[owner] += 1
            tenant_running += 1
    if not chosen:
        return 0
    woken = db.execute(update(Turn).where(Turn.id.in_(chosen), *_deferred()).values(enqueued_at=utcnow())
                       .returning(Turn.id).execution_options(synchronize_session=False)).scalars().all()
    for turn_id in woken:
        log.info("turn %s: a slot freed; sent", turn_id)
        after_commit(db, partial(rt.queue.enqueue_step, turn_id, 0))
    return len(woken)


def _candidates(*where: ColumnElement[bool], columns: tuple[str, ...] = ("id", "user_id")) -> Select[Any]:
    """The oldest deferred turns (Core, built once: every turn's end looks for them)."""
    turns, sessions = table_of(Turn).c, table_of(AgentSession).c
    active = select(sessions.active_turn_id).where(sessions.id == turns.session_id).scalar_subquery()
    return (select(*(turns[name] for name in columns))
            .where(turns.status == TurnStatus.QUEUED.value, turns.enqueued_at.is_(None),
                   turns.lease_expires_at.is_(None), turns.id == active, turns.tenant_id == bindparam("p_tenant"),
                   *where)
            .order_by(turns.created_at, turns.id).limit(SWEEP_BATCH))


_TENANT_CANDIDATES = _candidates()
_USER_CANDIDATES = _candidates(table_of(Turn).c.user_id == bindparam("p_user"))
# Postgres, a turn's end with the user cap only: (the try-lock's answer, the user's deferred turns' ids, oldest
# first; read only if the lock is held).
_waiting = _candidates(table_of(Turn).c.user_id == bindparam("p_user"), _LOCKED,
                       columns=("id", "created_at")).subquery("waiting")
_USER_WAITING_IF_LOCKED = select(
    _LOCKED.label("locked"),
    select(func.array_agg(aggregate_order_by(_waiting.c.id, _waiting.c.created_at, _waiting.c.id)))
    .scalar_subquery().label("waiting"))


def wake_deferred(rt: Runtime) -> int:
    """The sweep's safety net: wake deferred turns wherever a slot is free (a slot freed without :func:`wake`)."""
    if not caps_on(rt.settings):
        return 0
    with unit_of_work(rt.sessions, SYSTEM) as db:
        owners = db.execute(select(Turn.tenant_id, Turn.user_id).where(*_deferred()).distinct()
                            .limit(SWEEP_BATCH)).all()
    tenant_wide = rt.settings.max_running_turns_per_tenant > 0
    seen: set[tuple[str, str]] = set()
    woken = 0
    for tenant_id, user_id in owners:
        group = (tenant_id, "" if tenant_wide else user_id)
        if group not in seen:
            seen.add(group)
            woken += wake(rt, tenant_id, user_id)
    return woken
