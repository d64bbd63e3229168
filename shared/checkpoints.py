"""A session's checkpoints as deltas from a keyframe, with keyframes ever further apart as the history grows.

A step's checkpoint stores only the messages the step added, the number of the
checkpoint it extends (``base``), of the keyframe its chain starts from
(``keyframe``), how many messages that keyframe holds (``keyframe_size``) and
how many the chain's deltas hold so far, this one's included (``chain``):
``{"base": B, "keyframe": K, "keyframe_size": S, "chain": C, "messages": [...]}``.
A keyframe stores the whole history, ``{"messages": [...], "size": S}`` (every
checkpoint written before deltas existed is one, without ``size``). The history
as of checkpoint N is the keyframe's messages followed by each later
checkpoint's, up to N.

A checkpoint is a keyframe when its chain would reach KEYFRAME_EVERY rows *and*
its deltas would hold as many messages as the keyframe: so each keyframe holds
at least twice the one before, and all the keyframes of a session together hold
at most about twice its history. A step therefore writes what it added plus, on
average, a bounded share of a keyframe, whatever the session's length (turn
1,000 writes what turn 1 writes), and reading a history whole reads at most
about twice its messages.

Pruning old checkpoints keeps every row from the keyframe of the oldest kept one
(:func:`prune_floor`), so each kept checkpoint can still be read whole.

Reading the history whole is what still grows with the session, so a worker
keeps the histories it last saw (:class:`HistoryCache`): a step whose session's
latest checkpoint is the one this process holds reads only that checkpoint's id;
one whose session moved on since reads only the rows after the one it holds.
Checkpoint rows are never changed once written (only deleted), and ids are never
reused, so a row with the held id is the held history.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ScalarSelect, bindparam, select
from sqlalchemy.orm import Session

from shared.clock import aware
from shared.models import Checkpoint, table_of

KEYFRAME_EVERY = 32


@dataclass(frozen=True)
class Tip:
    """What the next checkpoint builds on: the latest one's number, its keyframe, and the chain's sizes."""

    number: int
    keyframe: int
    keyframe_size: int = 0  # messages in the keyframe (0: unknown, a checkpoint from before sizes were kept)
    chain: int = 0  # messages in the deltas after the keyframe, up to ``number``


def keyframe_of(number: int, state: dict[str, Any]) -> int:
    """The keyframe a checkpoint's chain starts from (its own number if it is one)."""
    keyframe = state.get("keyframe")
    return int(keyframe) if keyframe is not None else number


def latest(db: Session, session_id: str) -> Tip | None:
    """The session's latest checkpoint, without reading its messages; None if it has none."""
    state = Checkpoint.state
    row = db.execute(
        select(Checkpoint.number, state["keyframe"].as_integer(), state["keyframe_size"].as_integer(),
               state["chain"].as_integer(), state["size"].as_integer())
        .where(Checkpoint.session_id == session_id).order_by(Checkpoint.number.desc()).limit(1)
    ).first()
    return tip_of(*row) if row is not None else None


def tip_columns(session_id: Any) -> list[ScalarSelect[Any]]:
    """What :func:`latest` reads, as scalar subqueries (for :func:`tip_of`): a statement the writer runs
    anyway, after it locked the session row, returns them with its own row instead of a SELECT of their own."""
    table = table_of(Checkpoint).c
    state = table.state
    return [select(column).where(table.session_id == session_id).order_by(table.number.desc()).limit(1)
            .scalar_subquery()
            for column in (table.number, state["keyframe"].as_integer(), state["keyframe_size"].as_integer(),
                           state["chain"].as_integer(), state["size"].as_integer())]


def tip_of(number: int | None, keyframe: int | None, keyframe_size: int | None, chain: int | None,
           size: int | None) -> Tip | None:
    """The :class:`Tip` of the latest checkpoint's number and state fields; None if there is none."""
    if number is None:
        return None
    if keyframe is None:  # a keyframe itself
        return Tip(number, number, size or 0, 0)
    return Tip(number, keyframe, keyframe_size or 0, chain or 0)


def next_state(previous: Tip | None, history: list[Any], added: list[Any]) -> dict[str, Any]:
    """The state of the checkpoint after ``previous``, whose whole history is ``history`` followed by
    ``added``: a delta, or a keyframe once the chain is long enough and holds as much as its keyframe."""
    if previous is not None:
        chain = previous.chain + len(added)
        if previous.number + 1 - previous.keyframe < KEYFRAME_EVERY or chain < previous.keyframe_size:
            return {"base": previous.number, "keyframe": previous.keyframe,
                    "keyframe_size": previous.keyframe_size, "chain": chain, "messages": added}
    whole = history + added
    return {"messages": whole, "size": len(whole)}


@dataclass(frozen=True)
class Held:
    # Which row: its number, and the time its commit wrote into it (a row deleted by a rollback and its number
    # written again has another). Not the row's id: the commit would need a round trip to learn it.
    written_at: datetime
    number: int
    messages: tuple[Any, ...]


class HistoryCache:
    """The histories this process last saw, by session, least recently used out.

    Bounded by the messages it holds (``max_messages``; 0: nothing is kept). Thread-safe: a worker's
    greenlets (or threads) share one.
    """

    def __init__(self, max_messages: int):
        self.max_messages = max_messages
        self._entries: OrderedDict[str, Held] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        # Loads served whole from the cache, from it plus the rows after it, and from the database alone.
        self.hits = self.partial_hits = self.misses = 0

    def get(self, session_id: str) -> Held | None:
        with self._lock:
            held = self._entries.get(session_id)
            if held is not None:
                self._entries.move_to_end(session_id)
            return held

    def put(self, session_id: str, written_at: datetime, number: int, history: Sequence[Any]) -> None:
        held = Held(aware(written_at), number, tuple(history))
        with self._lock:
            old = self._entries.pop(session_id, None)
            if old is not None:
                self._held -= len(old.messages)
            if len(held.messages) > self.max_messages:
                return
            self._entries[session_id] = held
            self._held += len(held.messages)
            while self._held > self.max_messages:
                _, dropped = self._entries.popitem(last=False)
                self._held -= len(dropped.messages)

    def count(self, kind: str) -> None:
        with self._lock:
            setattr(self, kind, getattr(self, kind) + 1)


_READ: Any = object()


def load(db: Session, session_id: str, cache: HistoryCache | None = None, *,
         latest: tuple[int, int, int | None, datetime] | None = _READ) -> tuple[int | None, list[Any]]:
    """(the latest checkpoint's id, the session's whole history as of it); (None, []) with no checkpoint.

    One small read (the latest row's id, number and keyframe, not its messages), or none if the caller
    read them in a statement of its own (``latest``, None for no checkpoint: :func:`latest_columns`). Then,
    with ``cache``: nothing more if it holds that very checkpoint; the rows after the one it holds if that
    one is still in the latest's chain; else (and without a cache) the chain from the keyframe.
    """
    row = db.connection().execute(_LATEST, {"p_session": session_id}).first() if latest is _READ else latest
    if row is None:
        return None, []
    checkpoint_id, number, keyframe, written_at = row
    written_at = aware(written_at)
    keyframe = number if keyframe is None else keyframe
    held = cache.get(session_id) if cache is not None else None
    if cache is None or held is None or not keyframe <= held.number <= number:
        history = _chain(db, session_id, keyframe, number)
        kind = "misses"
    elif held.written_at == written_at:
        history, kind = list(held.messages), "hits"
    else:
        rows = _rows(db, session_id, held.number, number)
        if rows and aware(rows[0].created_at) == held.written_at:
            history, kind = [*held.messages, *_joined(session_id, rows[1:], rows[0].number + 1)], "partial_hits"
        else:  # the held row was deleted (a rollback) and its number written again
            history, kind = _chain(db, session_id, keyframe, number), "misses"
    if cache is not None:
        cache.count(kind)
        if kind != "hits":
            cache.put(session_id, written_at, number, history)
    return checkpoint_id, history


def messages(db: Session, checkpoint: Checkpoint) -> list[Any]:
    """The whole history as of ``checkpoint``: its keyframe's messages and every later delta's, in order."""
    keyframe = keyframe_of(checkpoint.number, checkpoint.state)
    if keyframe == checkpoint.number:
        return list(checkpoint.state["messages"])
    return _chain(db, checkpoint.session_id, keyframe, checkpoint.number)


def _rows(db: Session, session_id: str, low: int, high: int) -> list[Any]:
    """The rows (id, number, state) numbered ``low`` to ``high``, in order."""
    return list(db.connection().execute(_RANGE, {"p_session": session_id, "p_low": low, "p_high": high}))


# The reads of :func:`load` and :func:`_rows`, built once (Core: each call only binds its values).
_table = table_of(Checkpoint)


def _latest(session_id: Any) -> Any:
    """The latest checkpoint's id, number, keyframe and creation time of ``session_id`` (a bind or a column)."""
    return (select(_table.c.id, _table.c.number, _table.c.state["keyframe"].as_integer().label("keyframe"),
                   _table.c.created_at)
            .where(_table.c.session_id == session_id).order_by(_table.c.number.desc()).limit(1))


_LATEST = _latest(bindparam("p_session"))


def latest_columns(session_id: Any) -> list[Any]:
    """:data:`_LATEST`'s four values for the session ``session_id`` (a column of another statement), as that
    statement's columns ``latest_id``, ``latest_number``, ``latest_keyframe``, ``latest_created_at`` (NULL
    without a checkpoint), for :func:`load`'s ``latest``."""
    latest = _latest(session_id)
    return [latest.with_only_columns(column).scalar_subquery().label(f"latest_{name}")
            for column, name in zip(latest.selected_columns, ("id", "number", "keyframe", "created_at"), strict=True)]


_RANGE = (select(_table.c.id, _table.c.number, _table.c.state, _table.c.created_at)
          .where(_table.c.session_id == bindparam("p_session"), _table.c.number >= bindparam("p_low"),
                 _table.c.number <= bindparam("p_high"))
          .order_by(_table.c.number))


def _chain(db: Session, session_id: str, keyframe: int, number: int) -> list[Any]:
    rows = _rows(db, session_id, keyframe, number)
    if not rows or rows[0].number != keyframe or "base" in rows[0].state:
        raise RuntimeError(f"checkpoint chain of session {session_id} is broken at {keyframe}")
    return [*rows[0].state["messages"], *_joined(session_id, rows[1:], keyframe + 1)]


def _joined(session_id: str, rows: Sequence[Any], expected: int) -> list[Any]:
    """The messages of consecutive deltas, numbered from ``expected`` on, each extending the one before."""
    out: list[Any] = []
    for row in rows:
        if row.number != expected or row.state.get("base") != expected - 1:
            raise RuntimeError(f"checkpoint chain of session {session_id} is broken at {expected}")
        out.extend(row.state["messages"])
        expected = row.number + 1
    return out


def prune_floor(db: Session, session_id: str, cutoff: int) -> int:
    """The lowest checkpoint number that must be kept when keeping those above ``cutoff``: the keyframe of
    the oldest kept one (rows below it may go)."""
    row = db.execute(
        select(Checkpoint.number, Checkpoint.state["keyframe"].as_integer())
        .where(Checkpoint.session_id == session_id, Checkpoint.number > cutoff)
        .order_by(Checkpoint.number).limit(1)
    ).first()
    if row is None:
        return cutoff + 1
    number, keyframe = row
    return min(number, keyframe) if keyframe is not None else number
