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

Each successful publish of durable events also raises ``sessions.event_cursor``: the floor
below which a log must never issue a cursor again (a step's commit raises it past every cursor
the step saw, its deltas and the turn's non-durable events included).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import any_, bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from shared.auth.principal import SYSTEM, Principal, Scope
from shared.clock import utcnow
from shared.db import after_commit, unit_of_work, write_later
from shared.models import AgentSession, StreamEvent, new_id, table_of
from shared.runtime import Runtime
from shared.streaming.protocol import DURABLE_TYPES, EventLog, Fence, encode_event

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
    _publish_after_commit(db, rt, Principal(session.tenant_id, session.user_id), session.id, items)


# What a step still holds when it commits, taken after the commit (StepEvents.take_held): (id, body) pairs,
# and the ids of the durable events it appended already.
Held = Callable[[], tuple[list[tuple[str, str]], set[str]]]


def record_rows(db: Session, rt: Runtime, owner: Principal, session_id: str, items: list[Durable],
                held: Held | None = None) -> None:
    """:func:`record` for a caller that writes the session's row itself (the step's commit): the durable
    events in one Core INSERT, no ORM object; the caller raises ``sessions.event_cursor`` in its own UPDATE.
    ``held``: events to append ahead of ``items`` in the same append, taken once the commit landed."""
    now = utcnow()
    # A microsecond apart, in order: a republish reads them back by (created_at, id), and ids are random.
    rows = [{"id": e.id, "session_id": session_id, "tenant_id": owner.tenant_id, "user_id": owner.user_id,
             "turn_id": e.turn_id, "type": e.type, "body": e.body, "created_at": now + timedelta(microseconds=i)}
            for i, e in enumerate(e for e in items if e.type in DURABLE_TYPES)]
    write_later(db, _INSERT_EVENTS, rows)
    _publish_after_commit(db, rt, owner, session_id, items, held)


_INSERT_EVENTS = insert(table_of(StreamEvent))


def _publish_after_commit(db: Session, rt: Runtime, owner: Principal, session_id: str,
                          items: list[Durable], lead: Held | None = None) -> None:
    if not items:
        return
    # One append per session and transaction: a step's step.completed and the turn's end land
    # together or not at all, so no republish can put a step's event after its turn's end.
    pending: dict[str, tuple[list[Durable], list[Held], Any]] = db.info.setdefault("publish_events", {})
    held = pending.get(session_id)
    if held is not None and held[2] in db.info.get("after_commit", []):  # still to run with this commit
        held[0].extend(items)
        if lead is not None:
            held[1].append(lead)
        return
    batch, leads = list(items), [lead] if lead is not None else []

    def send() -> None:
        held: list[tuple[str, str]] = []
        appended: set[str] = set()
        for take in leads:
            pairs, done = take()
            held += pairs
            appended |= done
        # What the step appended itself is left out: what is left of ``batch`` is what only this commit
        # appends, so if the log holds any of it, the republish sweep came first (see publish).
        publish(rt, owner, session_id, [e for e in batch if e.id not in appended] if held else batch, held=held)

    pending[session_id] = (batch, leads, send)
    after_commit(db, send)


def publish(rt: Runtime, scope: Scope, session_id: str, items: list[Durable],
            held: Iterable[tuple[str, str]] = ()) -> int:
    """Append ``items`` (each id at most once) and mark them published; the last cursor (0: none added).

    Never fenced out: these events are what Postgres committed. A terminal event closes the
    turn's fence, so nothing a frozen attempt still holds can follow it. ``held``: (id, body) pairs
    a committed step still held (its last deltas), appended first, in their order, in the same append;
    left out if the log already holds one of ``items`` (the republish sweep came first: they would
    land after the turn's end).
    """
    by_turn: dict[str | None, bool] = {}
    for e in items:
        by_turn[e.turn_id] = by_turn.get(e.turn_id, False) or e.type in TERMINAL_EVENTS
    closing = [t for t, closes in by_turn.items() if closes and t]
    fence = Fence(closing[0], close=True) if closing else None
    pairs = list(held)
    lead = len(pairs)
    # A durable event among the held ones is in ``items`` too: the log takes it once, the first time.
    pairs += [(e.id if e.type in DURABLE_TYPES else "", e.body) for e in items]
    ids = [i for i, _ in pairs]
    done = rt.events.append_events(session_id, [b for _, b in pairs], ids=ids, fence=fence, lead=lead)
    for turn_id in closing[1:]:  # several turns ending in one commit (rare): close each fence
        rt.events.append_events(session_id, [], fence=Fence(turn_id, close=True))
    durable = [i for i in ids if i]
    # Only durable events need marking. An append of non-durable events alone (turn.queued) leaves
    # the cursor floor to the session's next commit, which raises it past every cursor its step saw,
    # as it does for the step's own deltas: no transaction of its own for it.
    if done.reset:
        threading.Thread(target=_after_reset, args=(rt, scope, session_id, durable, done.last),
                         name="steprun-republish", daemon=True).start()
    elif durable:
        # Off the caller's path: this runs after a commit whose connection is still checked out, and a
        # second checkout per publish starves the pool under concurrency (measured: 24 users at once got
        # pool timeouts). Batched: one transaction marks what every commit of this process published in
        # the last few milliseconds. Best effort: rows left unmarked are re-appended (skipped by id) and
        # marked by the scheduler's republish sweep.
        _marker(rt).add(session_id, durable, done.last)
    return done.last


def _after_reset(rt: Runtime, scope: Scope, session_id: str, ids: list[str], cursor: int) -> None:
    try:
        if ids or cursor:
            mark_published(rt, scope, session_id, ids, cursor)
        republish_session(rt, scope, session_id)
    except Exception:  # noqa: BLE001 - the republish sweep marks (and if need be re-appends) what is left
        log.warning("session %s: marking events published failed; the sweep will", session_id, exc_info=True)


# How long the marker gathers published events before marking them, in one transaction for all.
MARK_BATCH_SECONDS = 0.05
_markers: dict[int, _PublishedMarker] = {}
_markers_lock = threading.Lock()


def _marker(rt: Runtime) -> _PublishedMarker:
    with _markers_lock:
        marker = _markers.get(id(rt.sessions))
        if marker is None:
            marker = _markers[id(rt.sessions)] = _PublishedMarker(rt)
        return marker


class _PublishedMarker:
    """One thread per process marks published events (and raises cursor floors) in batches."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self._lock = threading.Lock()
        self._ids: list[str] = []
        self._cursors: dict[str, int] = {}
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="steprun-mark-published", daemon=True).start()

    def add(self, session_id: str, ids: list[str], cursor: int) -> None:
        self.give_back(ids, {session_id: cursor})

    def take(self) -> tuple[list[str], dict[str, int]]:
        """What is still to mark, taken: the caller marks it, or gives it back with :meth:`give_back`."""
        with self._lock:
            ids, cursors = self._ids, self._cursors
            self._ids, self._cursors = [], {}
        return ids, cursors

    def give_back(self, ids: list[str], cursors: dict[str, int]) -> None:
        """Mark ``ids`` and raise the sessions' floors to ``cursors`` (with what else is to mark)."""
        with self._lock:
            self._ids.extend(ids)
            for session_id, cursor in cursors.items():
                if cursor > self._cursors.get(session_id, 0):
                    self._cursors[session_id] = cursor
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(MARK_BATCH_SECONDS)  # gather what the other commits publish meanwhile
            self._wake.clear()
            ids, cursors = self.take()
            if not ids and not cursors:
                continue  # a system transaction took them meanwhile (:func:`system_work_marking_published`)
            try:
                # The system scope: the batch spans the sessions (and tenants) this process served.
                with unit_of_work(self.rt.sessions, SYSTEM) as db:
                    mark(db, ids, cursors)
            except Exception:  # noqa: BLE001 - the republish sweep marks (and if need be re-appends) what is left
                log.warning("marking %d events published failed; the sweep will", len(ids), exc_info=True)


@contextmanager
def system_work_marking_published(rt: Runtime) -> Iterator[Session]:
    """A unit of work in the system scope that also marks what this process published and has not marked yet.

    The marks are held (:func:`mark`'s writes) and go ahead of the transaction's first statement, so they take
    its locks first, in the order every turn change takes them (sessions, then events, then turns): the step's
    claim takes them this way, which saves the marker's own transaction whenever a claim comes within
    :data:`MARK_BATCH_SECONDS` of a publish (the next step of a tool turn; any claim under load). If the
    transaction rolls back, they go back to the marker.
    """
    marker = _markers.get(id(rt.sessions))
    ids, cursors = marker.take() if marker is not None else ([], {})
    try:
        with unit_of_work(rt.sessions, SYSTEM) as db:
            if ids or cursors:
                mark(db, ids, cursors)
            yield db
    except BaseException:
        if marker is not None and (ids or cursors):
            marker.give_back(ids, cursors)
        raise


_sessions_t, _events_t = table_of(AgentSession), table_of(StreamEvent)
# The marker's statements, built once and run on the transaction's connection (no ORM bulk update, no
# per-call construction; on Postgres the ids go as one array, not an IN list expanded at every call).
_cursor = bindparam("cursor", type_=_sessions_t.c.event_cursor.type)
_RAISE_FLOOR = (update(_sessions_t)
                .where(_sessions_t.c.id == bindparam("session_id"), _sessions_t.c.event_cursor < _cursor)
                .values(event_cursor=_cursor))
_now = bindparam("now", type_=_events_t.c.published_at.type)
_MARK_EVENTS = {
    "postgresql": update(_events_t).where(_events_t.c.id == any_(bindparam("ids", type_=ARRAY(_events_t.c.id.type))),
                                          _events_t.c.published_at.is_(None)).values(published_at=_now),
    "": update(_events_t).where(_events_t.c.id.in_(bindparam("ids", expanding=True)),
                                _events_t.c.published_at.is_(None)).values(published_at=_now),
}


def mark(db: Session, ids: list[str], cursors: dict[str, int]) -> None:
    """Mark ``ids`` published and raise each session's cursor floor, in the lock order of every turn change.

    Sessions first (in id order), then their events: a rollback locks its session, then deletes its
    turn's events. Marking the events first would hold their rows while waiting for the session's,
    and the two would deadlock (Postgres fails one of them: the rollback's client got 503).
    """
    write_later(db, _RAISE_FLOOR, [{"session_id": s, "cursor": c} for s, c in sorted(cursors.items()) if c])
    if ids:
        marking = _MARK_EVENTS.get(db.get_bind().dialect.name, _MARK_EVENTS[""])
        write_later(db, marking, {"ids": list(ids), "now": utcnow()})


def mark_published(rt: Runtime, scope: Scope, session_id: str, ids: list[str], cursor: int) -> None:
    """Record that ``ids`` reached the log, and raise the session's cursor floor to ``cursor``."""
    with unit_of_work(rt.sessions, scope) as db:
        mark(db, ids, {session_id: cursor})


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


# Events that end a wait on a turn's status: its end, or a pause for the user.
STATUS_EVENTS = TERMINAL_EVENTS | {"turn.requires_action"}
# How far back from the log's head a waiter looks for the turn's latest event: the newest few first (the
# session's running turn is usually the one asked about, so its newest event is among them), then further.
TAIL_FIRST = 4
TAIL_SCAN = 64


def turn_state_in_log(events: EventLog, session_id: str, turn_id: str) -> str | None:
    """What the session's log says of ``turn_id``: "ended" (its newest event ends or pauses it),
    "running" (its newest event does not), or None (none of the last :data:`TAIL_SCAN` events is its).

    A turn's terminal event is the last it ever appends (it closes the turn's fence), and a
    session runs one turn at a time, so the newest event of the turn tells where it is.
    """
    # Parsing a reply costs per event (deltas are the long ones): 4 first, and 64 only when those are not its.
    for count in (TAIL_FIRST, TAIL_SCAN):
        bodies = events.tail(session_id, count)
        state = _turn_state(bodies, turn_id)
        if state is not None or len(bodies) < count:
            return state  # found, or the whole log was read
    return None


def _turn_state(newest_first: list[str], turn_id: str) -> str | None:
    """What the newest of ``newest_first`` (stored event bodies) that is ``turn_id``'s says of it, as
    :func:`turn_state_in_log` answers; None: none is its."""
    mark = f'"turn_id":"{turn_id}"'
    for body in newest_first:
        head = body[:200]
        if mark not in head:
            continue
        kind = head[9:head.find('"', 9)] if head.startswith('{"type":"') else ""
        return "ended" if kind in STATUS_EVENTS else "running"
    return None


def _state_in_news(news: bytes | None, turn_id: str) -> str | None:
    """What a ring's news (the Redis log's: the append's last cursor, then its events, newline-separated)
    says of ``turn_id``: the append is the log's newest, so its newest event of the turn is the turn's."""
    if news is None or b"\n" not in news:
        return None
    return _turn_state(news.decode().split("\n")[:0:-1], turn_id)


def wait_turn_status(events: EventLog, session_id: str, turn_id: str, timeout: float,
                     still_running: Callable[[], bool]) -> None:
    """Return once ``turn_id`` ended or paused, or after ``timeout`` seconds: the long-poll's wait.

    One subscription for the whole wait, to the session's durable doorbell (rung by status
    changes, not by deltas); each ring looks at the log's tail only. ``still_running`` (a read
    of the turn) is asked only when the tail cannot tell (the turn's events are not among the
    last ones: it is queued behind a long turn, or its log expired), or once the tail says the
    turn ended, to confirm it (the caller reads the turn at the end anyway, so that read is it).
    """
    deadline = time.monotonic() + timeout
    with events.listen(session_id, durable=True) as ring:
        # Subscribed before the first look: a change after it rings; one before it is in the tail.
        news: bytes | None = None
        while True:
            # A ring carrying the turn's event needs no look at the tail (the turn's end usually does).
            state = _state_in_news(news, turn_id) or turn_state_in_log(events, session_id, turn_id)
            if state == "ended" or (state is None and not still_running()):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            # A doorbell lost in a reconnect: look again now and then anyway.
            rang = ring.wait(min(remaining, 1.0 if state == "running" else 5.0))
            ring.clear()
            # Taken after the clear: a ring landing between the two is looked at again, on the tail.
            news, ring.news = (ring.news if rang else None), None


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
