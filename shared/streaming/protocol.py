"""The per-session event log's contract, shared by its two implementations.

Events are stored as JSON text without their cursor; the cursor is the log
entry's id and is spliced in on the way out, so relaying an event never
decodes and re-encodes it. Cursors are integers, strictly increasing within a
session. A session's counter starts from the clock (microseconds), so a log
that Redis lost restarts *above* every cursor a client may hold: nothing a
client sees later can be mistaken for something it already has.

Appends from a step are *fenced* (:class:`Fence`): an append from an attempt
older than the newest one that wrote for the turn, or after the turn's terminal
event, is refused atomically, so a frozen worker's buffer never reaches a
client. An append may also carry a *floor*, the highest cursor the writer knows
the log issued (Postgres keeps it per session): a log found below it was
restored from an older snapshot, so the counter jumps past it (and the clock)
and every cursor from before the jump reads as gone (410), never reused.
Durable events (:data:`DURABLE_TYPES`) carry an id and are appended at most
once per log, so republishing them from Postgres is always safe.

Two implementations: :class:`shared.streaming.redis_log.RedisEventLog` (a Redis
stream per session, a counter, and a pub/sub "doorbell" rung by the same atomic
script) and :class:`shared.streaming.memory_log.MemoryEventLog` for the embedded
mode. ``tests/contract`` pins that both behave alike.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

# The largest cursor a client may send (JavaScript's and Redis's integers stay exact well above it).
MAX_CURSOR = 2**62

# The events that change what a client believes: written in the step's fenced commit (Postgres)
# and republished from there whenever the log may have lost them (shared/turns/republish.py).
DURABLE_TYPES = frozenset({
    "step.completed", "tool.call", "tool.result", "turn.requires_action", "turn.completed", "turn.failed",
    "turn.cancelled", "turn.expired", "turn.incomplete",
})


class Fenced(Exception):
    """An append refused: a newer attempt of the turn wrote to the log, or the turn ended."""


@dataclass(frozen=True)
class Fence:
    """Who appends: ``attempt`` is the turn's fencing number (0: not a step, e.g. the API or a sweep).

    ``close`` marks the turn ended (its terminal event is in this append): every later fenced
    append for the turn is refused.
    """

    turn_id: str
    attempt: int = 0
    close: bool = False


@dataclass
class Appended:
    """What an append did: its last cursor (0 when nothing was added), the cancel flag, and whether
    the log was found empty or older than ``floor`` (a new era: earlier cursors now read as gone)."""

    last: int
    cancelled: bool = False
    reset: bool = False


def encode_event(type_: str, turn_id: str | None, data: dict[str, Any] | None = None) -> str:
    """An event body as stored: everything but the cursor."""
    return json.dumps(
        {"type": type_, "turn_id": turn_id, "data": data or {}, "ts": round(time.time(), 6)},
        separators=(",", ":"),
    )


def with_cursor(cursor: int, body: str) -> str:
    return f'{{"cursor":{cursor},{body[1:]}'


@dataclass
class Batch:
    """Events read from a log: raw JSON texts with cursors, and where to continue."""

    events: list[str]
    next: int
    # True when events after the requested cursor were trimmed or expired.
    gone: bool = False
    # Where a client told ``gone`` can read on from: the cursor before the oldest event kept (on a read
    # that is not gone, a cursor the log goes on from without a gap: it may be the reader's own).
    since: int = 0


class EventLog(Protocol):
    def append(self, session_id: str, bodies: Iterable[str], cancel_turn_id: str | None = None) -> tuple[int, bool]:
        """Append events; returns (last cursor, whether ``cancel_turn_id`` has a cancel request)."""
        ...

    def append_events(self, session_id: str, bodies: Sequence[str], *, ids: Sequence[str] | None = None,
                      fence: Fence | None = None, floor: int = 0,
                      cancel_turn_id: str | None = None, lead: int = 0) -> Appended:
        """Append atomically. ``ids`` (one per body, '' for none): a body whose id this log already
        holds is skipped. ``fence``: refused whole (:class:`Fenced`) if a newer attempt of the turn
        wrote, or the turn ended. ``floor``: the highest cursor the caller knows this log issued.
        ``lead``: the first ``lead`` bodies go only ahead of the rest: skipped if the log already holds
        an id of the rest (a committed step's last deltas, once its commit's events came without them)."""
        ...

    def read(self, session_id: str, after: int, limit: int = 500) -> Batch: ...

    def head(self, session_id: str) -> int:
        """The last cursor of the session's log (0 if it has none)."""
        ...

    def wait(self, session_id: str, after: int, timeout: float, limit: int = 500) -> Batch:
        """Like read, but waits up to ``timeout`` seconds for something after ``after``."""
        ...

    def tail(self, session_id: str, count: int) -> list[str]:
        """The last ``count`` event bodies of the session's log (without cursors), newest first."""
        ...

    def listen(self, session_id: str, durable: bool = False) -> AbstractContextManager[Ring]:
        """A wake-up flag, set when the session may have new events, for as long as the block runs.

        ``durable``: set only by appends that add a durable event (:data:`DURABLE_TYPES`: step and
        turn status changes, tool calls), not by deltas: for waiters on a status.

        A doorbell, not a delivery: it may ring spuriously or (during a Redis
        reconnect) late, so a listener clears it, re-reads the log after its
        last cursor, and only then waits on it again.
        """
        ...

    def delete(self, session_id: str) -> None: ...

    def request_cancel(self, turn_id: str) -> None: ...

    def cancel_requested(self, turn_id: str) -> bool: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


class Ring:
    """A waiter's wake-up flag. ``on_set``, if given, is called at each ring too, with the ring's news (a
    session tail sets its viewers' rings from it, and takes the news: shared/streaming/tail.py)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.on_set: Callable[[bytes | None], None] | None = None
        # The last ring's news, for a waiter that looks at it (None: that ring carried none).
        self.news: bytes | None = None

    def set(self, news: bytes | None = None) -> None:
        """Wake the waiter. ``news``: the doorbell's message, when it has one (the Redis log's: the append's
        last cursor, and its events when they were small enough to ride along; see redis_log.RING_BYTES)."""
        self.news = news
        self._event.set()
        if self.on_set is not None:
            self.on_set(news)

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def clear(self) -> None:
        self._event.clear()



def is_gone(after: int, first: int | None, head: int, low: int) -> bool:
    """Whether a reader after ``after`` may have missed events this log no longer has.

    ``first``/``head``: the oldest and newest cursor kept (None/0 when empty); ``low``: where the
    current era of the log began (cursors at or below it were issued by a log since lost).
    """
    if after <= 0:
        return False
    if first is None:
        return True  # the log is empty: expired, or lost by Redis
    # Trimmed or expired; from an era since lost; or never issued by this log (a restore from an
    # older snapshot lost the events up to it).
    return after < first - 1 or after < low or after > head


def clock_start() -> int:
    """Where a new session counter starts: the clock in microseconds, above any earlier cursor."""
    return int(time.time() * 1_000_000)
