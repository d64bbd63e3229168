"""API keys: random, shown once, stored only as a SHA-256 hash."""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import ApiKey, Tenant

KEY_PREFIX = "sr_"


@dataclass(frozen=True)
class KeyIdentity:
    key_id: str
    tenant_id: str
    # None for a service key: it names the user per request.
    user_id: str | None
    # A tenant admin key: the console's, refused by the /v1 API.
    admin: bool = False


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_key(db: Session, tenant_id: str, user_id: str | None, name: str | None = None, *,
               admin: bool = False) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the raw key, which is never stored.

    An ``admin`` key belongs to no user: it signs in to the tenant's console.
    """
    if admin and user_id is not None:
        raise ValueError("an admin key belongs to no user")
    if db.get(Tenant, tenant_id) is None:
        db.add(Tenant(id=tenant_id))
        db.flush()
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(tenant_id=tenant_id, user_id=user_id, key_hash=hash_key(raw), prefix=raw[:10], name=name,
                 admin=admin)
    db.add(row)
    db.flush()
    return row, raw


class KeyCache:
    """Recently verified keys, per process, so a request does not always cost a database round trip.

    Keyed by the key's hash; entries live ``ttl`` seconds, so a revoked key
    stops working within that time. Bounded: the oldest entries go first.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000):
        self.ttl, self.max_entries = ttl, max_entries
        self._entries: dict[str, tuple[float, KeyIdentity]] = {}
        self._lock = threading.Lock()

    def get(self, raw: str) -> KeyIdentity | None:
        if self.ttl <= 0:
            return None
        digest = hash_key(raw)
        with self._lock:
            hit = self._entries.get(digest)
            if hit is None or hit[0] < time.monotonic():
                self._entries.pop(digest, None)
                return None
            return hit[1]

    def put(self, raw: str, identity: KeyIdentity) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[hash_key(raw)] = (time.monotonic() + self.ttl, identity)

    def forget(self, key_hash: str) -> None:
        """Drop a key (by its stored hash) at once: a revoke in this process takes effect here immediately."""
        with self._lock:
            self._entries.pop(key_hash, None)


class LiveKeys:
    """Which key ids are live (not revoked), per process: what a stream token or an open socket rechecks.

    Each answer is trusted ``ttl`` seconds, so the many sockets of one key cost one lookup per window;
    the sockets recheck at the same period, so a revoked key's sockets close within twice ``ttl``. When an
    answer runs out, one lookup goes to the database and the key's other sockets wait for it: sockets
    opened together recheck together, and 5,000 of them once took every connection of the system pool at
    the same moment (the API answered new connections 503 for seconds).
    """

    def __init__(self, ttl: float, max_entries: int = 10_000):
        self.ttl, self.max_entries = ttl, max_entries
        self._entries: dict[str, tuple[float, bool]] = {}
        self._lookups: dict[str, _Lookup] = {}
        self._lock = threading.Lock()

    def is_live(self, system: Callable[[], AbstractContextManager[Session]], key_id: str) -> bool:
        """``system``: opens a transaction on the system path (the application login cannot read keys)."""
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(key_id)
            if hit is not None and hit[0] >= now:
                return hit[1]
            lookup = self._lookups.get(key_id)
            leader = lookup is None
            if lookup is None:
                lookup = self._lookups[key_id] = _Lookup()
        if not leader:
            if lookup.done.wait(LOOKUP_WAIT_SECONDS) and lookup.live is not None:
                return lookup.live
            # It failed or is stuck: look it up alone (an error then reaches this caller, which retries).
            with system() as db:
                return key_is_live(db, key_id)
        try:
            with system() as db:
                live = key_is_live(db, key_id)
            lookup.live = live
        finally:
            with self._lock:
                self._lookups.pop(key_id, None)
                if lookup.live is not None and self.ttl > 0:
                    if len(self._entries) >= self.max_entries:
                        self._entries.pop(next(iter(self._entries)))
                    self._entries[key_id] = (now + self.ttl, lookup.live)
            lookup.done.set()
        return live

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._entries.pop(key_id, None)


# How long a recheck waits for the same key's lookup already under way before doing its own.
LOOKUP_WAIT_SECONDS = 10.0


class _Lookup:
    """One key's lookup under way: its answer, for the callers that wait for it."""

    __slots__ = ("done", "live")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.live: bool | None = None


def key_is_live(db: Session, key_id: str) -> bool:
    """Whether ``key_id`` names a key that is not revoked."""
    return db.execute(select(ApiKey.id).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))).first() is not None


def identify_key(db: Session, raw: str) -> KeyIdentity | None:
    row = db.execute(
        select(ApiKey.id, ApiKey.tenant_id, ApiKey.user_id, ApiKey.admin).where(
            ApiKey.key_hash == hash_key(raw), ApiKey.revoked_at.is_(None)
        )
    ).first()
    return KeyIdentity(row.id, row.tenant_id, row.user_id, bool(row.admin)) if row else None


def list_keys(db: Session, tenant_id: str) -> list[ApiKey]:
    return list(db.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)))


def revoke_key(db: Session, key_id: str) -> bool:
    """Revoke a key by id; False if there is no such live key."""
    from shared.clock import utcnow

    row = db.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    return True
