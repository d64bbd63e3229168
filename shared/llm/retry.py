"""The retry budget of one step's model call: attempts and seconds, backoff with jitter, Retry-After honoured.

A step makes at most ``attempts`` requests to the provider and stops retrying
once ``seconds`` have passed since its first one: a 429 or 5xx storm then
costs one step a bounded number of requests and a bounded wait, and the turn
fails with the provider's last words instead of being re-run by the queue.

Delays are "full jitter" (a random wait between 0 and an exponentially growing
cap), so many steps failing together do not come back together; a
``Retry-After`` from the provider is a floor, with a little jitter on top.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable

MAX_BACKOFF = 20.0


class RetryBudget:
    def __init__(self, attempts: int, seconds: float, *, base: float = 0.5, cap: float = MAX_BACKOFF,
                 clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random):
        self.attempts = max(1, attempts)
        self.seconds = max(0.0, seconds)
        self.base, self.cap = base, cap
        self.clock, self.rand = clock, rand
        self.started = clock()
        self.used = 0

    def attempt(self) -> int:
        """Count one request; returns its number (1-based)."""
        self.used += 1
        return self.used

    def elapsed(self) -> float:
        return self.clock() - self.started

    def next_delay(self, retry_after: float | None = None) -> float | None:
        """How long to wait before the next request, or None when the budget is spent."""
        if self.used >= self.attempts:
            return None
        if retry_after is not None:
            delay = retry_after + self.rand() * min(1.0, 0.1 * retry_after + 0.1)
        else:
            delay = self.rand() * min(self.cap, self.base * 2 ** max(0, self.used - 1))
        if self.elapsed() + delay > self.seconds:
            return None
        return delay

    def describe(self) -> str:
        return f"{self.used} request(s) in {self.elapsed():.1f}s"
