"""Stream slots (shared/streaming/slots.py) on the real Redis, and the WebSocket frame budget."""
from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
import redis

from api.websocket import FrameBudget
from shared.streaming.slots import MemoryStreamSlots, RedisStreamSlots, Slot, SlotLimits
from tests.support.processes import REDIS_URL, RUN_ID


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(REDIS_URL)
    yield c
    c.close()


def _prefix() -> str:
    return f"steprun-test-{RUN_ID}-{secrets.token_hex(3)}"


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_a_user_and_a_tenant_get_their_limits_and_released_slots_come_back(client: redis.Redis, kind: str) -> None:
    slots = RedisStreamSlots(client, _prefix(), 30) if kind == "redis" else MemoryStreamSlots()
    limits = SlotLimits(per_user=2, per_tenant=3)
    a1, a2 = slots.acquire("t", "a", limits), slots.acquire("t", "a", limits)
    assert isinstance(a1, Slot) and isinstance(a2, Slot)
    assert slots.acquire("t", "a", limits) == "user"
    b1 = slots.acquire("t", "b", limits)
    assert isinstance(b1, Slot)
    assert slots.acquire("t", "b", limits) == "tenant"  # b holds 1 of 2, the tenant 3 of 3
    assert isinstance(slots.acquire("other", "a", limits), Slot)  # same user id, another tenant: its own count
    assert slots.held("t", "a") == (2, 3)
    a1.release()
    a1.release()  # once only
    assert slots.held("t", "a") == (1, 2)
    assert isinstance(slots.acquire("t", "a", limits), Slot)
    assert isinstance(slots.acquire("t", "a", SlotLimits(0, 0)), Slot)  # 0: no limit


def test_ids_with_separators_do_not_share_a_count(client: redis.Redis) -> None:
    slots = RedisStreamSlots(client, _prefix(), 30)
    one = SlotLimits(per_user=1, per_tenant=0)
    assert isinstance(slots.acquire("a:b", "c", one), Slot)
    assert isinstance(slots.acquire("a", "b:c", one), Slot)


def test_a_slot_nobody_renews_stops_counting_after_its_lease(client: redis.Redis) -> None:
    prefix = _prefix()
    dead = RedisStreamSlots(client, prefix, 1.0)  # a process that dies right after taking its slots
    dead._renew_loop = lambda: None  # type: ignore[method-assign]  # killed: nothing renews
    limits = SlotLimits(per_user=1, per_tenant=0)
    assert isinstance(dead.acquire("t", "u", limits), Slot)
    alive = RedisStreamSlots(client, prefix, 1.0)
    assert alive.acquire("t", "u", limits) == "user"
    time.sleep(1.2)
    assert isinstance(alive.acquire("t", "u", limits), Slot)


def test_a_dead_process_slots_are_dropped_by_a_living_one_renewing_the_same_sets(client: redis.Redis) -> None:
    """Taking a slot counts live members only (no cleanup per stream); the renewals drop the dead ones."""
    prefix = _prefix()
    dead = RedisStreamSlots(client, prefix, 1.0)
    dead._renew_loop = lambda: None  # type: ignore[method-assign]  # killed: nothing renews
    limits = SlotLimits(per_user=0, per_tenant=0)
    for _ in range(3):
        assert isinstance(dead.acquire("t", "u", limits), Slot)
    alive = RedisStreamSlots(client, prefix, 1.0)
    assert isinstance(alive.acquire("t", "u", limits), Slot)
    user_key = f"{prefix}:streams:{{1:t}}:u:u"
    assert client.zcard(user_key) == 4
    time.sleep(1.6)  # the dead leases ran out; the living slot was renewed (every third of a lease)
    assert alive.held("t", "u") == (1, 1)
    assert client.zcard(user_key) == 1 and client.zcard(f"{prefix}:streams:{{1:t}}:t") == 1


def test_a_living_process_keeps_its_slots_past_the_lease(client: redis.Redis) -> None:
    prefix = _prefix()
    holder = RedisStreamSlots(client, prefix, 1.0)
    limits = SlotLimits(per_user=1, per_tenant=0)
    assert isinstance(holder.acquire("t", "u", limits), Slot)
    time.sleep(2.5)  # two and a half leases, renewed every third of one
    assert RedisStreamSlots(client, prefix, 1.0).acquire("t", "u", limits) == "user"


def test_the_frame_budget_allows_a_burst_then_the_rate() -> None:
    budget = FrameBudget(10)
    assert sum(budget.take() for _ in range(100)) == 20  # the burst: twice the rate
    time.sleep(0.5)
    assert 5 <= sum(budget.take() for _ in range(100)) <= 10  # refilled at the rate (0.5 s: 5, or a few more if late)
    assert all(FrameBudget(0).take() for _ in range(1000))  # 0: unlimited
