"""API keys: random, shown once, stored only as a SHA-256 hash."""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import ApiKey, Tenant

KEY_PREFIX = "sr_"


@dataclass(frozen=True)
class Principal:
    """The (tenant, user) a request acts as."""

    tenant_id: str
    user_id: str


@dataclass(frozen=True)
class KeyIdentity:
    key_id: str
    tenant_id: str
    # None for a service key: it names the user per request.
    user_id: str | None


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_key(db: Session, tenant_id: str, user_id: str | None, name: str | None = None) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the raw key, which is never stored."""
    if db.get(Tenant, tenant_id) is None:
        db.add(Tenant(id=tenant_id))
        db.flush()
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(tenant_id=tenant_id, user_id=user_id, key_hash=hash_key(raw), prefix=raw[:10], name=name)
    db.add(row)
    db.flush()
    return row, raw


def identify_key(db: Session, raw: str) -> KeyIdentity | None:
    row = db.execute(
        select(ApiKey.id, ApiKey.tenant_id, ApiKey.user_id).where(
            ApiKey.key_hash == hash_key(raw), ApiKey.revoked_at.is_(None)
        )
    ).first()
    return KeyIdentity(row.id, row.tenant_id, row.user_id) if row else None
