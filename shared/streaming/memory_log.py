"""The embedded mode's event log: the same behaviour as the Redis one, in one process."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from shared.streaming.protocol import Appended, Batch, Fence, Fenced, Ring, clock_start, is_gone, with_cursor

# A fence closed by the turn's terminal event: above every attempt.
_CLOSED = 2**52


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
        # Per session: where its current era began, and the ids of the durable events it holds.
        self._eras: dict[str, int] = {}
        self._ids: dict[str, set[str]] = {}
        # Per turn: the newest attempt that appended (or _CLOSED), and when, to drop idle ones.
        self._fences: dict[str, tuple[int, float]] = {}
        self._cancels: set[str] = set()
        self._rings: dict[str, set[Ring]] = defaultdict(set)
        self._cond = threading.Condition()

    def _expire(self, session_id: str, now: float) -> None:
        """Drop ``session_id``'s log if it is idle past the retention (the lock is held)."""
        if now - self._appended.get(session_id, now) > self.retention:
            self._logs.pop(session_id, None)
            self._counters.pop(session_id, None)
            self._appended.pop(session_id, None)
            self._eras.pop(session_id, None)
            self._ids.pop(session_id, None)

    def _live(self, session_id: str) -> list[tuple[int, str]]:
        now = time.monotonic()
        self._expire(session_id, now)
        if now >= self._next_sweep:  # now and then, drop every idle log, so memory stays bounded
            self._next_sweep = now + min(60.0, max(self.retention, 1))
            for other in list(self._appended):
                self._expire(other, now)
            for turn_id, (_, at) in list(self._fences.items()):
                if now - at > self.retention:
                    del self._fences[turn_id]
        return self._logs.get(session_id, [])

    def append(self, session_id: str, bodies: Iterable[str], cancel_turn_id: str | None = None) -> tuple[int, bool]:
        done = self.append_events(session_id, list(bodies), cancel_turn_id=cancel_turn_id)
        return done.last, done.cancelled

    def append_events(self, session_id: str, bodies: Sequence[str], *, ids: Sequence[str] | None = None,
                      fence: Fence | None = None, floor: int = 0,
                      cancel_turn_id: str | None = None, lead: int = 0) -> Appended:
        with self._cond:
            self._live(session_id)
            now = time.monotonic()
            if fence is not None:
                held = self._fences.get(fence.turn_id, (0, now))[0]
                if fence.attempt > 0 and held > fence.attempt:
                    raise Fenced(f"turn {fence.turn_id}: attempt {fence.attempt} is fenced out of the event log")
                mark = _CLOSED if fence.close else fence.attempt
                self._fences[fence.turn_id] = (max(held, mark), now)
            self._appended[session_id] = now
            log = self._logs.setdefault(session_id, [])
            c = self._counters.get(session_id) or 0
            reset = False
            if not c or c < floor:
                c = max(clock_start(), floor)
                self._eras[session_id] = c
                self._ids.pop(session_id, None)  # each era holds each durable event at most once
                reset = True
            held_ids = self._ids.setdefault(session_id, set())
            last = 0
            start = lead if lead and any(i in held_ids for i in (ids or ())[lead:] if i) else 0
            for i, body in enumerate(bodies):
                if i < start:
                    continue
                event_id = ids[i] if ids else ""
                if event_id:
                    if event_id in held_ids:
                        continue
                    held_ids.add(event_id)
                c += 1
                last = c
                log.append((c, body))
            self._counters[session_id] = c
            if len(log) > self.max_len:
                del log[: len(log) - self.max_len]
            if last:
                self._cond.notify_all()
                for ring in self._rings.get(session_id, ()):
                    ring.set()
                if any(ids or ()):
                    for ring in self._rings.get(session_id + ":d", ()):
                        ring.set()
            return Appended(last, cancel_turn_id in self._cancels, reset)

    def read(self, session_id: str, after: int, limit: int = 500) -> Batch:
        with self._cond:
            log = self._live(session_id)
            selected = [(c, b) for c, b in log if c > after][:limit]
            low = self._eras.get(session_id, 0)
            gone = is_gone(after, log[0][0] if log else None, log[-1][0] if log else 0, low)
            since = max(low, log[0][0] - 1) if log else low
        events = [with_cursor(c, b) for c, b in selected]
        return Batch(events, selected[-1][0] if selected else after, gone, since)

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

    def tail(self, session_id: str, count: int) -> list[str]:
        with self._cond:
            return [b for _, b in reversed(self._live(session_id)[-count:])] if count > 0 else []

    @contextmanager
    def listen(self, session_id: str, durable: bool = False) -> Iterator[Ring]:
        ring = Ring()
        key = session_id + ":d" if durable else session_id
        with self._cond:
            self._rings[key].add(ring)
        try:
            yield ring
        finally:
            with self._cond:
                rings = self._rings.get(key)
                if rings is not None:
                    rings.discard(ring)
                    if not rings:
                        del self._rings[key]

    def delete(self, session_id: str) -> None:
        with self._cond:
            self._logs.pop(session_id, None)
            self._counters.pop(session_id, None)
            self._eras.pop(session_id, None)
            self._ids.pop(session_id, None)

    def request_cancel(self, turn_id: str) -> None:
        with self._cond:
            self._cancels.add(turn_id)

    def cancel_requested(self, turn_id: str) -> bool:
        return turn_id in self._cancels

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None
