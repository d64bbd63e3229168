"""Durable events: the events that change what a client believes, kept in Postgres with their commit.

``step.completed``, ``tool.call``, ``tool.result``, ``turn.requires_action`` and the
terminal turn events (:data:`shared.streaming.protocol.DURABLE_TYPES`) are written as
:class:`~shared.models.StreamEvent` rows in the transaction that makes them true, then
appended to the session's event log after the commit. The log appends each event id
at most once, so any of these may publish them again without a duplicate:

- the commit itself (after it; a failure leaves ``published_at`` NULL);
- the scheduler's sweep (:func:`republish_unpublished`): rows still unpublished after
  :data:`REPUBLISH_AFTER_SECONDS` (Redis was away at commit time, or the worker died
  right after its commit);
- :func:`republish_session`: a log that lost events (Redis lost its data, or was
  restored from an older snapshot) gets the session's recent durable events again, so
  a client told 410 can read them from the cursor the 410 names.

Each successful publish also raises ``sessions.event_cursor``: the floor below which a
log must never issue a cursor again.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from shared.auth.principal import SYSTEM, Principal, Scope
from shared.clock import utcnow
from shared.db import after_commit, unit_of_work
from shared.models import AgentSession, StreamEvent, new_id
from shared.runtime import Runtime
from shared.streaming.protocol import DURABLE_TYPES, Fence, encode_event

log = logging.getLogger(__name__)

TERMINAL_EVENTS = frozenset({"turn.completed", "turn.failed", "turn.cancelled", "turn.expired", "turn.incomplete"})
# The commit publishes its own events; the sweep steps in for those still unpublished after this long.
REPUBLISH_AFTER_SECONDS = 2.0
# At most this many events per sweep round (the rest wait for the next round).
SWEEP_BATCH = 500


@dataclass(frozen=True)
class Durable:
    """One durable event: its id (the log appends it once) and its body as stored."""

    id: str
    turn_id: str | None
    type: str
    body: str

    @classmethod
    def new(cls, type_: str, turn_id: str | None, data: dict[str, Any] | None) -> Durable:
        return cls(new_id("ev"), turn_id, type_, encode_event(type_, turn_id, data))


def record(db: Session, rt: Runtime, session: AgentSession, events: Iterable[Durable | tuple[str, str | None,
           dict[str, Any] | None]], *, cursor: int = 0) -> None:
    """Write ``events`` in ``db``'s transaction and publish them after its commit, in order.

    Events of a type that is not durable (e.g. ``turn.queued``) are published the same way
    but not kept. ``cursor``: the highest cursor the writer saw the log issue (kept as the floor).
    """
    items = [e if isinstance(e, Durable) else Durable.new(*e) for e in events]
    for e in items:
        if e.type in DURABLE_TYPES:
            db.add(StreamEvent(id=e.id, session_id=session.id, tenant_id=session.tenant_id,
                               user_id=session.user_id, turn_id=e.turn_id, type=e.type, body=e.body))
    if cursor > (session.event_cursor or 0):
        session.event_cursor = cursor
    if not items:
        return
    # One append per session and transaction: a step's step.completed and the turn's end land
    # together or not at all, so no republish can put a step's event after its turn's end.
    pending: dict[str, tuple[list[Durable], Any]] = db.info.setdefault("publish_events", {})
    held = pending.get(session.id)
    if held is not None and held[1] in db.info.get("after_commit", []):  # still to run with this commit
        held[0].extend(items)
        return
    batch = list(items)
    owner = Principal(session.tenant_id, session.user_id)
    session_id = session.id

    def send() -> None:
        publish(rt, owner, session_id, batch)

    pending[session.id] = (batch, send)
    after_commit(db, send)


def publish(rt: Runtime, scope: Scope, session_id: str, items: list[Durable]) -> int:
    """Append ``items`` (each id at most once) and mark them published; the last cursor (0: none added).

    Never fenced out: these events are what Postgres committed. A terminal event closes the
    turn's fence, so nothing a frozen attempt still holds can follow it.
    """
    by_turn: dict[str | None, bool] = {}
    for e in items:
        by_turn[e.turn_id] = by_turn.get(e.turn_id, False) or e.type in TERMINAL_EVENTS
    closing = [t for t, closes in by_turn.items() if closes and t]
    fence = Fence(closing[0], close=True) if closing else None
    ids = [e.id if e.type in DURABLE_TYPES else "" for e in items]
    done = rt.events.append_events(session_id, [e.body for e in items], ids=ids, fence=fence)
    for turn_id in closing[1:]:  # several turns ending in one commit (rare): close each fence
        rt.events.append_events(session_id, [], fence=Fence(turn_id, close=True))
    durable = [i for i in ids if i]
    if durable or done.last or done.reset:
        # Off the caller's path: this runs after a commit whose connection is still checked out, and a
        # second checkout per publish starves the pool under concurrency (measured: 24 users at once got
        # pool timeouts). Best effort: rows left unmarked are re-appended (skipped by id) and marked by
        # the scheduler's republish sweep.
        threading.Thread(target=_after_publish, args=(rt, scope, session_id, durable, done.last, done.reset),
                         name="steprun-mark-published", daemon=True).start()
    return done.last


def _after_publish(rt: Runtime, scope: Scope, session_id: str, ids: list[str], cursor: int, reset: bool) -> None:
    try:
        if ids or cursor:
            mark_published(rt, scope, session_id, ids, cursor)
        if reset:
            republish_session(rt, scope, session_id)
    except Exception:  # noqa: BLE001 - the republish sweep marks (and if need be re-appends) what is left
        log.warning("session %s: marking events published failed; the sweep will", session_id, exc_info=True)


def mark_published(rt: Runtime, scope: Scope, session_id: str, ids: list[str], cursor: int) -> None:
    """Record that ``ids`` reached the log, and raise the session's cursor floor to ``cursor``."""
    with unit_of_work(rt.sessions, scope) as db:
        if ids:
            db.execute(update(StreamEvent).where(StreamEvent.id.in_(ids), StreamEvent.published_at.is_(None))
                       .values(published_at=utcnow()).execution_options(synchronize_session=False))
        if cursor:
            db.execute(update(AgentSession).where(AgentSession.id == session_id)
                       .values(event_cursor=case((AgentSession.event_cursor < cursor, cursor),
                                                 else_=AgentSession.event_cursor))
                       .execution_options(synchronize_session=False))


def republish_session(rt: Runtime, scope: Scope, session_id: str) -> int:
    """Append the session's recent durable events again (the log skips those it holds); the last cursor.

    For a log that lost events: the client told 410 reads every recent step's committed text
    and every turn's end from the cursor the 410 names.
    """
    since = utcnow() - timedelta(seconds=rt.settings.event_retention_seconds)
    with unit_of_work(rt.sessions, scope) as db:
        rows = db.execute(select(StreamEvent.id, StreamEvent.turn_id, StreamEvent.type, StreamEvent.body)
                          .where(StreamEvent.session_id == session_id, StreamEvent.created_at >= since)
                          .order_by(StreamEvent.created_at, StreamEvent.id).limit(rt.settings.event_log_max)).all()
    if not rows:
        return 0
    items = [Durable(r.id, r.turn_id, r.type, r.body) for r in rows]
    last = 0
    # One append per turn, so each turn's fence closes with its own terminal event.
    for turn_items in _by_turn(items):
        done = rt.events.append_events(session_id, [e.body for e in turn_items], ids=[e.id for e in turn_items],
                                       fence=_closing_fence(turn_items))
        last = max(last, done.last)
    mark_published(rt, scope, session_id, [e.id for e in items], last)
    log.info("session %s: republished %d durable events to its event log", session_id, len(items))
    return last


def republish_unpublished(rt: Runtime) -> int:
    """The sweep: publish durable events whose commit could not (Redis away, or the worker died after it)."""
    stale = utcnow() - timedelta(seconds=REPUBLISH_AFTER_SECONDS)
    with unit_of_work(rt.sessions, SYSTEM) as db:
        rows = db.execute(select(StreamEvent.id, StreamEvent.session_id, StreamEvent.turn_id, StreamEvent.type,
                                 StreamEvent.body)
                          .where(StreamEvent.published_at.is_(None), StreamEvent.created_at < stale)
                          .order_by(StreamEvent.created_at, StreamEvent.id).limit(SWEEP_BATCH)).all()
    sessions: dict[str, list[Durable]] = defaultdict(list)
    for r in rows:
        sessions[r.session_id].append(Durable(r.id, r.turn_id, r.type, r.body))
    published = 0
    for session_id, items in sessions.items():
        try:
            last = 0
            reset = False
            for turn_items in _by_turn(items):
                done = rt.events.append_events(session_id, [e.body for e in turn_items],
                                               ids=[e.id for e in turn_items], fence=_closing_fence(turn_items))
                last, reset = max(last, done.last), reset or done.reset
            mark_published(rt, SYSTEM, session_id, [e.id for e in items], last)
            if reset:
                republish_session(rt, SYSTEM, session_id)
            published += len(items)
            log.warning("session %s: published %d durable events its commit could not", session_id, len(items))
        except Exception:  # noqa: BLE001 - Redis still away: the next round tries again
            log.warning("session %s: durable events still unpublished", session_id, exc_info=True)
            break
    return published


def _by_turn(items: list[Durable]) -> list[list[Durable]]:
    groups: dict[str | None, list[Durable]] = {}
    for e in items:
        groups.setdefault(e.turn_id, []).append(e)
    return list(groups.values())


def _closing_fence(items: list[Durable]) -> Fence | None:
    turn_id = items[0].turn_id
    if turn_id and any(e.type in TERMINAL_EVENTS for e in items):
        return Fence(turn_id, close=True)
    return None
