"""The embedded mode's event log: the same behaviour as the Redis one, in one process."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from shared.streaming.protocol import Batch, Ring, clock_start, with_cursor


class MemoryEventLog:
    """The embedded mode's log: the same behaviour in one process."""

    def __init__(self, *, retention_seconds: int, max_len: int):
        self.max_len = max_len
        self.retention = retention_seconds
        self._logs: dict[str, list[tuple[int, str]]] = {}
        # time.monotonic() of each session's last append: a log idle past the retention is dropped,
        # as Redis expires the stream and its counter (the counter then restarts from the clock).
        self._appended: dict[str, float] = {}
        self._next_sweep = 0.0
        self._counters: dict[str, int] = {}
        self._cancels: set[str] = set()
        self._rings: dict[str, set[Ring]] = defaultdict(set)
        self._cond = threading.Condition()

    def _expire(self, session_id: str, now: float) -> None:
        """Drop ``session_id``'s log if it is idle past the retention (the lock is held)."""
        if now - self._appended.get(session_id, now) > self.retention:
            self._logs.pop(session_id, None)
            self._counters.pop(session_id, None)
            self._appended.pop(session_id, None)

    def _live(self, session_id: str) -> list[tuple[int, str]]:
        now = time.monotonic()
        self._expire(session_id, now)
        if now >= self._next_sweep:  # now and then, drop every idle log, so memory stays bounded
            self._next_sweep = now + min(60.0, max(self.retention, 1))
            for other in list(self._appended):
                self._expire(other, now)
        return self._logs.get(session_id, [])

    def append(self, session_id: str, bodies: Iterable[str], cancel_turn_id: str | None = None) -> tuple[int, bool]:
        with self._cond:
            self._live(session_id)
            self._appended[session_id] = time.monotonic()
            log = self._logs.setdefault(session_id, [])
            c = self._counters.get(session_id) or clock_start()
            for body in bodies:
                c += 1
                log.append((c, body))
            self._counters[session_id] = c
            if len(log) > self.max_len:
                del log[: len(log) - self.max_len]
            self._cond.notify_all()
            for ring in self._rings.get(session_id, ()):
                ring.set()
            return c, cancel_turn_id in self._cancels

    def read(self, session_id: str, after: int, limit: int = 500) -> Batch:
        with self._cond:
            log = self._live(session_id)
            selected = [(c, b) for c, b in log if c > after][:limit]
            gone = after > 0 and (not log or after < log[0][0] - 1)
        events = [with_cursor(c, b) for c, b in selected]
        return Batch(events, selected[-1][0] if selected else after, gone)

    def head(self, session_id: str) -> int:
        with self._cond:
            log = self._live(session_id)
            return log[-1][0] if log else 0

    def wait(self, session_id: str, after: int, timeout: float, limit: int = 500) -> Batch:
        deadline = time.monotonic() + timeout
        with self._cond:  # reentrant: read() takes it too, so no append slips between
            while True:
                batch = self.read(session_id, after, limit)
                remaining = deadline - time.monotonic()
                if batch.events or batch.gone or remaining <= 0:
                    return batch
                self._cond.wait(min(remaining, 1.0))

    @contextmanager
    def listen(self, session_id: str) -> Iterator[Ring]:
        ring = Ring()
        with self._cond:
            self._rings[session_id].add(ring)
        try:
            yield ring
        finally:
            with self._cond:
                rings = self._rings.get(session_id)
                if rings is not None:
                    rings.discard(ring)
                    if not rings:
                        del self._rings[session_id]

    def delete(self, session_id: str) -> None:
        with self._cond:
            self._logs.pop(session_id, None)

    def request_cancel(self, turn_id: str) -> None:
        with self._cond:
            self._cancels.add(turn_id)

    def cancel_requested(self, turn_id: str) -> bool:
        return turn_id in self._cancels

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None
