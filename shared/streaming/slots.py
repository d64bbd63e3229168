"""Stream slots: how many streams (WebSocket, SSE, long-poll waits) one user and one tenant hold open.

Every open stream holds a connection of an API process until it ends, so one
principal opening hundreds of them starves everyone else of that process. A
stream takes a slot of its user and of its tenant before it starts, and gives
them back when it ends; when either is full it is refused (429, or close code
4429 on a WebSocket).

Production counts in Redis, across every API process: a sorted set per user and
per tenant whose members are the open slots, each scored with the time its lease
runs out. A process renews its slots' leases every third of the lease
(``STEPRUN_STREAM_SLOT_SECONDS``); a slot whose process was killed is not renewed
and stops counting when its lease runs out, so a crash leaks nothing for longer
than one lease. The embedded mode (one process) counts in memory.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlotLimits:
    """Most streams a user and a tenant may hold open at once (0: no limit)."""

    per_user: int
    per_tenant: int


@dataclass
class Slot:
    """One held stream slot; :meth:`release` gives it back (once, however often it is called)."""

    owner: StreamSlots
    member: str
    keys: tuple[str, ...]
    released: bool = field(default=False)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.owner.release(self)


class StreamSlots(Protocol):
    def acquire(self, tenant_id: str, user_id: str, limits: SlotLimits) -> Slot | str:
        """Take a slot of the user and of the tenant: the slot, or the scope that is full ("user" / "tenant")."""
        ...

    def release(self, slot: Slot) -> None:
        ...

    def held(self, tenant_id: str, user_id: str) -> tuple[int, int]:
        """Slots the user and the tenant hold now, across processes (for tests and the console)."""
        ...


def _keys(prefix: str, tenant_id: str, user_id: str) -> tuple[str, str]:
    # The tenant in braces: both keys hash to one Redis Cluster slot, so one script may touch them.
    # Lengths first: no tenant/user pair can spell another's key.
    tenant = f"{prefix}:streams:{{{len(tenant_id)}:{tenant_id}}}"
    return f"{tenant}:u:{user_id}", f"{tenant}:t"


# KEYS: the user's set, the tenant's set. ARGV: member, lease seconds, user limit, tenant limit (0: none).
# Refuses if a set is full of live slots (returns 1: user, 2: tenant), else adds the member to both.
# Expired members are not counted (ZCOUNT above now), and are dropped by the renewals (_RENEW_LUA) or
# with their set's TTL, not here: two commands fewer per stream.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[2])
for i = 1, 2 do
  local limit = tonumber(ARGV[2 + i])
  if limit > 0 and redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf') >= limit then return i end
end
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], now + lease, ARGV[1])
  redis.call('EXPIRE', KEYS[i], math.ceil(lease) + 1)
end
return 0
"""

# KEYS: pairs of (user set, tenant set); ARGV: lease seconds, then one member per pair. Extends each lease,
# and drops the expired members (a killed process's slots) of each set once.
_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local until_ = now + tonumber(ARGV[1])
local ttl = math.ceil(tonumber(ARGV[1])) + 1
for i = 1, #KEYS do
  local member = ARGV[1 + math.floor((i + 1) / 2)]
  redis.call('ZADD', KEYS[i], 'XX', until_, member)
  redis.call('EXPIRE', KEYS[i], ttl)
end
local cleaned = {}
for i = 1, #KEYS do
  if not cleaned[KEYS[i]] then
    cleaned[KEYS[i]] = true
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  end
end
return #KEYS
"""

# KEYS: user set, tenant set. ARGV: nothing. Counts the live members of each.
_HELD_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return {redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf'), redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')}
"""


class RedisStreamSlots:
    """Slots counted in Redis for every API process, with leases this process renews while it lives."""

    def __init__(self, client: Any, prefix: str, lease_seconds: float):
        self.redis, self.prefix = client, prefix
        self.lease = max(1.0, float(lease_seconds))
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._held = client.register_script(_HELD_LUA)
        self._open: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        # Unique per process and slot, so a restarted process never renews a dead one's slots.
        self._process = secrets.token_hex(6)

    def acquire(self, tenant_id: str, user_id: str, limits: SlotLimits) -> Slot | str:
        keys = _keys(self.prefix, tenant_id, user_id)
        member = f"{self._process}:{secrets.token_hex(6)}"
        try:
            full = int(self._acquire(keys=list(keys), args=[member, self.lease, max(0, limits.per_user),
                                                             max(0, limits.per_tenant)]))
        except Exception:  # noqa: BLE001 - Redis away: the stream itself fails or retries; do not refuse it here
            log.warning("stream slots: Redis unreachable; this stream is not counted", exc_info=True)
            return Slot(self, "", ())
        if full:
            return "user" if full == 1 else "tenant"
        slot = Slot(self, member, keys)
        with self._lock:
            self._open[member] = slot
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_loop, name="stream-slot-leases", daemon=True)
                self._renewer.start()
        return slot

    def release(self, slot: Slot) -> None:
        if not slot.member:
            return
        with self._lock:
            self._open.pop(slot.member, None)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key in slot.keys:
                pipe.zrem(key, slot.member)
            pipe.execute()
        except Exception:  # noqa: BLE001 - the lease runs out by itself
            log.warning("stream slots: could not release a slot; its lease ends it", exc_info=True)

    def held(self, tenant_id: str, user_id: str) -> tuple[int, int]:
        user, tenant = self._held(keys=list(_keys(self.prefix, tenant_id, user_id)))
        return int(user), int(tenant)

    def _renew_loop(self) -> None:
        while True:
            time.sleep(self.lease / 3)
            with self._lock:
                slots = list(self._open.values())
            if not slots:
                continue
            try:
                for start in range(0, len(slots), 500):
                    chunk = slots[start:start + 500]
                    self._renew(keys=[k for s in chunk for k in s.keys],
                                args=[self.lease, *[s.member for s in chunk]])
            except Exception:  # noqa: BLE001 - retried next round, well inside the lease
                log.warning("stream slots: renewing %d lease(s) failed", len(slots), exc_info=True)


class MemoryStreamSlots:
    """Slots of the one embedded process, counted in memory."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, tenant_id: str, user_id: str, limits: SlotLimits) -> Slot | str:
        keys = _keys("", tenant_id, user_id)
        with self._lock:
            for scope, key, limit in (("user", keys[0], limits.per_user), ("tenant", keys[1], limits.per_tenant)):
                if limit > 0 and self._counts.get(key, 0) >= limit:
                    return scope
            for key in keys:
                self._counts[key] = self._counts.get(key, 0) + 1
        return Slot(self, "memory", keys)

    def release(self, slot: Slot) -> None:
        with self._lock:
            for key in slot.keys:
                left = self._counts.get(key, 0) - 1
                if left > 0:
                    self._counts[key] = left
                else:
                    self._counts.pop(key, None)

    def held(self, tenant_id: str, user_id: str) -> tuple[int, int]:
        user, tenant = _keys("", tenant_id, user_id)
        with self._lock:
            return self._counts.get(user, 0), self._counts.get(tenant, 0)
