"""The per-session event log's contract, shared by its two implementations.

Events are stored as JSON text without their cursor; the cursor is the log
entry's id and is spliced in on the way out, so relaying an event never
decodes and re-encodes it. Cursors are integers, strictly increasing within a
session. A session's counter starts from the clock (microseconds), so a log
that Redis lost restarts *above* every cursor a client may hold: nothing a
client sees later can be mistaken for something it already has.

Two implementations: :class:`shared.streaming.redis_log.RedisEventLog` (a Redis
stream per session, a counter, and a pub/sub "doorbell" rung by the same atomic
script) and :class:`shared.streaming.memory_log.MemoryEventLog` for the embedded
mode. ``tests/contract`` pins that both behave alike.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

# The largest cursor a client may send (JavaScript's and Redis's integers stay exact well above it).
MAX_CURSOR = 2**62


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


class EventLog(Protocol):
    def append(self, session_id: str, bodies: Iterable[str], cancel_turn_id: str | None = None) -> tuple[int, bool]:
        """Append events; returns (last cursor, whether ``cancel_turn_id`` has a cancel request)."""
        ...

    def read(self, session_id: str, after: int, limit: int = 500) -> Batch: ...

    def head(self, session_id: str) -> int:
        """The last cursor of the session's log (0 if it has none)."""
        ...

    def wait(self, session_id: str, after: int, timeout: float, limit: int = 500) -> Batch:
        """Like read, but waits up to ``timeout`` seconds for something after ``after``."""
        ...

    def listen(self, session_id: str) -> AbstractContextManager[Ring]:
        """A wake-up flag, set when the session may have new events, for as long as the block runs.

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
    """A waiter's wake-up flag."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def clear(self) -> None:
        self._event.clear()



def clock_start() -> int:
    """Where a new session counter starts: the clock in microseconds, above any earlier cursor."""
    return int(time.time() * 1_000_000)
