"""Per-principal rate limits: RedisRateLimiter (production) and MemoryRateLimiter (embedded) count alike.

A fixed window: up to ``limit`` hits per key per window are allowed (``None``);
beyond it every hit is refused with the seconds until the window ends.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator

import pytest

from shared.auth.limits import MemoryRateLimiter, RateLimiter, RedisRateLimiter

HOUR = 3600


@pytest.fixture(params=["redis", "memory"])
def limiter(request: pytest.FixtureRequest) -> Iterator[RateLimiter]:
    if request.param == "redis":
        yield RedisRateLimiter(request.getfixturevalue("redis_client"), request.getfixturevalue("unique_name"))
    else:
        yield MemoryRateLimiter()


def _key() -> str:
    return f"t-{secrets.token_hex(4)}/u-{secrets.token_hex(4)}"


def _inside_one_window(window: int, margin: float) -> None:
    """Sleep into the next window if fewer than ``margin`` seconds are left of this one."""
    left = window - time.time() % window
    if left < margin:
        time.sleep(left + 0.05)


def test_allows_up_to_the_limit_then_refuses_with_the_time_left(limiter: RateLimiter) -> None:
    _inside_one_window(HOUR, 10)
    key = _key()
    assert [limiter.hit(key, 5, HOUR) for _ in range(5)] == [None] * 5
    for _ in range(3):  # every hit beyond the limit, not just the first
        asked = time.time()
        retry_after = limiter.hit(key, 5, HOUR)
        assert retry_after is not None
        assert 0 < retry_after <= HOUR
        assert abs(retry_after - (HOUR - asked % HOUR)) < 1.0  # the seconds until the window ends


def test_independent_keys_are_counted_independently(limiter: RateLimiter) -> None:
    _inside_one_window(HOUR, 10)
    a, b = _key(), _key()
    assert limiter.hit(a, 2, HOUR) is None and limiter.hit(a, 2, HOUR) is None
    assert limiter.hit(a, 2, HOUR) is not None
    assert limiter.hit(b, 2, HOUR) is None and limiter.hit(b, 2, HOUR) is None  # b has its own two
    assert limiter.hit(b, 2, HOUR) is not None
    assert limiter.hit(a, 2, HOUR) is not None  # and a is still refused


def test_the_next_window_starts_from_zero(limiter: RateLimiter) -> None:
    window = 2
    _inside_one_window(window, 1.5)
    key = _key()
    assert limiter.hit(key, 1, window) is None
    retry_after = limiter.hit(key, 1, window)
    assert retry_after is not None and 0 < retry_after <= window
    time.sleep(retry_after + 0.05)
    assert limiter.hit(key, 1, window) is None  # a new window
    assert limiter.hit(key, 1, window) is not None


def test_concurrent_hits_are_all_counted(limiter: RateLimiter) -> None:
    _inside_one_window(HOUR, 10)
    key = _key()
    barrier = threading.Barrier(8)
    results: list[float | None] = []
    lock = threading.Lock()

    def hammer() -> None:
        barrier.wait()
        for _ in range(25):
            r = limiter.hit(key, 100, HOUR)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 200
    assert sum(r is None for r in results) == 100  # exactly the limit, none lost or double-counted


def test_hit_all_counts_every_bucket_and_names_the_first_over(limiter: RateLimiter) -> None:
    _inside_one_window(HOUR, 10)
    user, key, tenant = _key(), _key(), _key()
    # Several users behind one key: the user buckets change, the key's and the tenant's fill.
    assert limiter.hit_all([(user + "1", 10), (key, 3), (tenant, 5)], HOUR) is None
    assert limiter.hit_all([(user + "2", 10), (key, 3), (tenant, 5)], HOUR) is None
    assert limiter.hit_all([(user + "3", 10), (key, 3), (tenant, 5)], HOUR) is None
    over = limiter.hit_all([(user + "4", 10), (key, 3), (tenant, 5)], HOUR)
    assert over is not None and over[0] == 1 and 0 < over[1] <= HOUR  # the key's bucket (index 1)
    # The refused request was counted in the tenant's bucket too: 4 of 5 used.
    assert limiter.hit_all([(_key(), 10), (tenant, 5)], HOUR) is None
    over = limiter.hit_all([(_key(), 10), (tenant, 5)], HOUR)
    assert over is not None and over[0] == 1


def test_hit_all_reads_the_watched_buckets_without_counting_them(limiter: RateLimiter) -> None:
    _inside_one_window(HOUR, 10)
    user, failures = _key(), _key()
    assert limiter.hit_all([(user, 10)], HOUR, watch=[(failures, 2)]) is None
    limiter.hit(failures, 2, HOUR)
    assert limiter.hit_all([(user, 10)], HOUR, watch=[(failures, 2)]) is None
    limiter.hit(failures, 2, HOUR)
    over = limiter.hit_all([(user, 10)], HOUR, watch=[(failures, 2)])
    assert over is not None and over[0] == 1 and 0 < over[1] <= HOUR  # the watched bucket, after the counted
    assert limiter.peek(failures, 3, HOUR) is None  # watching counted nothing: still 2


def test_peek_reads_without_counting(limiter: RateLimiter) -> None:
    _inside_one_window(HOUR, 10)
    key = _key()
    assert [limiter.peek(key, 2, HOUR) for _ in range(5)] == [None] * 5  # nothing counted
    limiter.hit(key, 2, HOUR)
    assert limiter.peek(key, 2, HOUR) is None
    limiter.hit(key, 2, HOUR)
    waited = limiter.peek(key, 2, HOUR)  # the limit reached: the next hit would be refused
    assert waited is not None and 0 < waited <= HOUR
