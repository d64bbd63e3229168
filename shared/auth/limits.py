"""Rate limits: fixed one-minute windows counted in Redis (or in memory, embedded).

A request is counted in several buckets at once (its user, its key, its tenant:
``api/auth.py``) with one round trip, one script; a client address's failed
authentications have their own bucket, read before any key lookup.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol


class RateLimiter(Protocol):
    def hit(self, key: str, limit: int, window: int = 60) -> float | None:
        """Count one request; None if allowed, else the seconds until the window resets."""
        ...

    def hit_all(self, buckets: Sequence[tuple[str, int]], window: int = 60,
                watch: Sequence[tuple[str, int]] = ()) -> tuple[int, float] | None:
        """Count one request in every (key, limit) bucket and read the ``watch`` buckets (as :meth:`peek`),
        in one round trip; the first over its limit (a ``watch`` bucket's index follows the counted ones)
        and the wait, or None."""
        ...

    def peek(self, key: str, limit: int, window: int = 60) -> float | None:
        """Like :meth:`hit` without counting: the wait if the bucket is already over its limit, else None."""
        ...


def _reset(now: float, window: int) -> float:
    return window - (now % window)


# KEYS: the buckets to count, then the buckets to read. ARGV: the buckets' TTL, how many KEYS are counted.
# A bucket's TTL is set once, by the request that creates it (its name holds its window, so it never
# outlives it): one INCR per counted bucket, not an INCR and an EXPIRE.
_HIT_LUA = """
local counted = tonumber(ARGV[2])
local out = {}
for i = 1, counted do
  local n = redis.call('INCR', KEYS[i])
  if n == 1 then redis.call('EXPIRE', KEYS[i], ARGV[1]) end
  out[i] = n
end
for i = counted + 1, #KEYS do out[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end
return out
"""


class RedisRateLimiter:
    def __init__(self, client: Any, prefix: str):
        self.redis, self.prefix = client, prefix
        self._hit = client.register_script(_HIT_LUA)

    def _bucket(self, key: str, now: float, window: int) -> str:
        return f"{self.prefix}:rl:{key}:{int(now // window)}"

    def hit(self, key: str, limit: int, window: int = 60) -> float | None:
        over = self.hit_all([(key, limit)], window)
        return None if over is None else over[1]

    def hit_all(self, buckets: Sequence[tuple[str, int]], window: int = 60,
                watch: Sequence[tuple[str, int]] = ()) -> tuple[int, float] | None:
        now = time.time()
        names = [self._bucket(key, now, window) for key, _ in [*buckets, *watch]]
        replies = [int(n) for n in self._hit(keys=names, args=[window + 5, len(buckets)])] if names else []
        for i, ((_, limit), count) in enumerate(zip(buckets, replies[:len(buckets)], strict=True)):
            if count > limit:
                return i, _reset(now, window)
        for j, ((_, limit), seen) in enumerate(zip(watch, replies[len(buckets):], strict=True)):
            if seen >= limit:
                return len(buckets) + j, _reset(now, window)
        return None

    def peek(self, key: str, limit: int, window: int = 60) -> float | None:
        now = time.time()
        count = int(self.redis.get(self._bucket(key, now, window)) or 0)
        return None if count < limit else _reset(now, window)


class MemoryRateLimiter:
    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, limit: int, window: int = 60) -> float | None:
        over = self.hit_all([(key, limit)], window)
        return None if over is None else over[1]

    def hit_all(self, buckets: Sequence[tuple[str, int]], window: int = 60,
                watch: Sequence[tuple[str, int]] = ()) -> tuple[int, float] | None:
        now = time.time()
        current = int(now // window)
        over: tuple[int, float] | None = None
        with self._lock:
            # Old windows are dropped as they pass, so memory stays bounded by active principals.
            for stale in [k for k in self._counts if k[1] < current]:
                del self._counts[stale]
            for i, (key, limit) in enumerate(buckets):
                count = self._counts.get((key, current), 0) + 1
                self._counts[(key, current)] = count
                if count > limit and over is None:
                    over = (i, _reset(now, window))
            for j, (key, limit) in enumerate(watch):
                if over is None and self._counts.get((key, current), 0) >= limit:
                    over = (len(buckets) + j, _reset(now, window))
        return over

    def peek(self, key: str, limit: int, window: int = 60) -> float | None:
        now = time.time()
        with self._lock:
            count = self._counts.get((key, int(now // window)), 0)
        return None if count < limit else _reset(now, window)
