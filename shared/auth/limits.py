"""Per-principal rate limits: a fixed one-minute window counted in Redis (or in memory, embedded)."""
from __future__ import annotations

import threading
import time
from typing import Any, Protocol


class RateLimiter(Protocol):
    def hit(self, key: str, limit: int, window: int = 60) -> float | None:
        """Count one request; None if allowed, else the seconds until the window resets."""
        ...


class RedisRateLimiter:
    def __init__(self, client: Any, prefix: str):
        self.redis, self.prefix = client, prefix

    def hit(self, key: str, limit: int, window: int = 60) -> float | None:
        now = time.time()
        bucket = f"{self.prefix}:rl:{key}:{int(now // window)}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(bucket)
        pipe.expire(bucket, window + 5)
        count, _ = pipe.execute()
        return None if count <= limit else window - (now % window)


class MemoryRateLimiter:
    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, limit: int, window: int = 60) -> float | None:
        now = time.time()
        current = int(now // window)
        with self._lock:
            # Old windows are dropped as they pass, so memory stays bounded by active principals.
            for stale in [k for k in self._counts if k[1] < current]:
                del self._counts[stale]
            count = self._counts.get((key, current), 0) + 1
            self._counts[(key, current)] = count
        return None if count <= limit else window - (now % window)
