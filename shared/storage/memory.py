"""Long-term memory: a per-user store of JSON values under (namespace, key).

Reached by clients through /v1/memory and by tools through
``ToolContext.memory`` (a :class:`MemoryStore` bound to the call's principal).
Every query is scoped to (tenant, user); expired items are invisible at once
and removed by the scheduler's storage sweep. Service functions take the
database session first and do not commit.
"""
from __future__ import annotations

import builtins
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnClause, ColumnElement, Select, delete, func, literal_column, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from shared.auth.principal import Principal
from shared.clock import aware, utcnow
from shared.db import rowcount, unit_of_work
from shared.errors import BadInput, NotFound, TooLarge
from shared.models import MemoryItem
from shared.paging import page
from shared.settings import Settings
from shared.storage import quotas, textsearch

NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_KEY_CHARS = 256
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
MAX_PAGE = 100


def check_address(namespace: Any, key: Any) -> None:
    """400 unless the namespace and key are usable (the key may hold anything but '/' and control characters)."""
    if not isinstance(namespace, str) or not NAMESPACE_RE.fullmatch(namespace):
        raise BadInput("namespace must be 1-128 characters of letters, digits and _ . : -", field="namespace")
    if (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS or "/" in key
            or any(ord(c) < 32 for c in key)):
        raise BadInput(f"key must be 1-{MAX_KEY_CHARS} characters, without '/' or control characters", field="key")


def searchable_text(key: str, value: Any) -> str:
    """The words search matches: the key (split at _ and -) and every string and number in the value."""
    parts = [re.sub(r"[_\-.:]+", " ", key)]

    def walk(v: Any) -> None:
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, bool) or v is None:
            return
        elif isinstance(v, (int, float)):
            parts.append(str(v))
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)
        elif isinstance(v, list):
            for item in v:
                walk(item)

    walk(value)
    return " ".join(parts)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _scoped(who: Principal) -> Select[MemoryItem]:
    now = utcnow()
    return select(MemoryItem).where(
        MemoryItem.tenant_id == who.tenant_id,
        MemoryItem.user_id == who.user_id,
        or_(MemoryItem.expires_at.is_(None), MemoryItem.expires_at > now),
    )


def put_item(db: Session, settings: Settings, who: Principal, namespace: str, key: str, value: Any,
             ttl_seconds: Any = None) -> tuple[MemoryItem, bool]:
    """Create or replace one item. Returns (item, created)."""
    check_address(namespace, key)
    try:
        encoded = json.dumps(value)
    except (TypeError, ValueError):
        raise BadInput("value must be JSON", field="value") from None
    if _has_nul(value):  # JSONB cannot hold NUL
        raise BadInput("value contains a NUL character", field="value")
    if len(encoded.encode()) > settings.max_memory_value_bytes:
        raise TooLarge(f"value is larger than {settings.max_memory_value_bytes} bytes", field="value")
    if ttl_seconds is not None and (isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int)
                                    or not 0 < ttl_seconds <= MAX_TTL_SECONDS):
        raise BadInput(f"ttl_seconds must be an integer from 1 to {MAX_TTL_SECONDS}", field="ttl_seconds")
    expires_at = utcnow() + timedelta(seconds=ttl_seconds) if ttl_seconds else None
    text = searchable_text(key, value)
    owner = (MemoryItem.tenant_id == who.tenant_id, MemoryItem.user_id == who.user_id,
             MemoryItem.namespace == namespace, MemoryItem.key == key)
    for _ in range(2):
        row = db.scalars(select(MemoryItem).where(*owner).with_for_update()).first()
        if row is not None:
            created = row.expires_at is not None and aware(row.expires_at) <= utcnow()
            row.value, row.text, row.expires_at, row.updated_at = value, text, expires_at, utcnow()
            if created:  # an expired item is gone as far as anyone could see: this is a new one
                row.created_at = row.updated_at
            db.flush()
            return row, created
        row = MemoryItem(tenant_id=who.tenant_id, user_id=who.user_id, namespace=namespace, key=key,
                         value=value, text=text, expires_at=expires_at)
        try:
            with db.begin_nested():
                db.add(row)
                db.flush()
            return row, True
        except IntegrityError:
            continue  # a concurrent put created it first: update that one
    raise RuntimeError("memory item could neither be created nor found")


def get_item(db: Session, who: Principal, namespace: str, key: str) -> MemoryItem:
    check_address(namespace, key)
    row = db.scalars(_scoped(who).where(MemoryItem.namespace == namespace, MemoryItem.key == key)).first()
    if row is None:
        raise NotFound(f"no memory {namespace}/{key}")
    return row


def delete_item(db: Session, who: Principal, namespace: str, key: str) -> None:
    db.delete(get_item(db, who, namespace, key))
    db.flush()


def list_items(db: Session, who: Principal, namespace: str | None, limit: int,
               after: int | None) -> tuple[list[MemoryItem], int | None]:
    """Newest first; ``after`` is the ``next`` of the previous page."""
    query = _scoped(who)
    if namespace:
        query = query.where(MemoryItem.namespace == namespace)
    if after:
        query = query.where(MemoryItem.id < after)
    return page(db.scalars(query.order_by(MemoryItem.id.desc()).limit(limit + 1)), limit, lambda row: row.id)


@dataclass
class Hit:
    item: MemoryItem
    score: float


def search_items(db: Session, who: Principal, q: str, namespace: str | None, limit: int,
                 offset: int = 0) -> tuple[list[Hit], int | None]:
    """Items matching ``q``, best first (full-text rank on Postgres, word count on SQLite)."""
    if not textsearch.terms(q):
        return [], None
    query = _scoped(who)
    if namespace:
        query = query.where(MemoryItem.namespace == namespace)
    if textsearch.dialect(db) == "postgresql":
        tsq = func.websearch_to_tsquery(literal_column("'english'::regconfig"), textsearch.postgres_query(q, "any"))
        tsv: ColumnClause[Any] = literal_column("memory_items.tsv")
        # ts_rank's float on Postgres, a count of words elsewhere: either is "higher is better".
        score: ColumnElement[Any] = func.ts_rank(tsv, tsq)
        query = query.where(tsv.op("@@")(tsq))
    else:
        # Memory is small per user and the owner index narrows it first: counting words is enough here.
        score = textsearch.term_count(MemoryItem.text, q)
        query = query.where(score > 0)
    rows = db.execute(
        query.add_columns(score.label("score"))
        .order_by(literal_column("score").desc(), MemoryItem.updated_at.desc())
        .offset(offset).limit(limit + 1)
    ).all()
    found, next_offset = page(rows, limit, lambda _last: offset + limit)
    return [Hit(r[0], float(r[1])) for r in found], next_offset


def purge_expired(db: Session, now: datetime | None = None) -> int:
    """Delete every expired item (all users): the retention sweep."""
    result = db.execute(delete(MemoryItem).where(MemoryItem.expires_at <= (now or utcnow()))
                        .execution_options(synchronize_session=False))
    return rowcount(result)


def item_dict(row: MemoryItem) -> dict[str, Any]:
    return {"namespace": row.namespace, "key": row.key, "value": row.value,
            "updated_at": aware(row.updated_at).isoformat()}


class MemoryStore:
    """The memory of one user, as a tool sees it (``ctx.memory``). Each call is its own transaction.

    Tools run outside the step's commit (a tool's effect is not rolled back by
    a failed step), so a tool that writes should use a deterministic key, as
    ``remember`` does, to make a retried attempt harmless.

    ``fence`` runs first in every writing transaction: the step engine passes
    one that locks the call's turn and raises if the turn is no longer the
    step's (lease lost, or erased with the user's data), so nothing is written.
    """

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, who: Principal,
                 fence: Callable[[Session], None] | None = None):
        self._sessions, self._settings, self._who, self._fence = sessions, settings, who, fence

    def _writing(self, db: Session) -> None:
        if self._fence is not None:
            self._fence(db)

    def put(self, namespace: str, key: str, value: Any, ttl_seconds: int | None = None) -> None:
        check_address(namespace, key)
        with unit_of_work(self._sessions, self._who) as db:
            self._writing(db)
            quotas.serialise_new_memory_items(db, self._settings, self._who)
            # A full quota is an error the tool reports (the model is told), not a failed step. Counted in
            # a transaction of its own (the tenant's items), after the lock above: it sees every earlier write.
            quotas.check_memory_item(self._sessions, self._settings, self._who, namespace, key)
            put_item(db, self._settings, self._who, namespace, key, value, ttl_seconds)

    def get(self, namespace: str, key: str) -> Any:
        """The value, or None if there is none."""
        with unit_of_work(self._sessions, self._who) as db:
            try:
                return get_item(db, self._who, namespace, key).value
            except NotFound:
                return None

    def delete(self, namespace: str, key: str) -> bool:
        with unit_of_work(self._sessions, self._who) as db:
            self._writing(db)
            try:
                delete_item(db, self._who, namespace, key)
                return True
            except NotFound:
                return False

    def list(self, namespace: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        with unit_of_work(self._sessions, self._who) as db:
            rows, _ = list_items(db, self._who, namespace, min(limit, MAX_PAGE), None)
            return [item_dict(r) for r in rows]

    # builtins.list: inside this class, ``list`` is the method above.
    def search(self, query: str, namespace: str | None = None, limit: int = 5) -> builtins.list[dict[str, Any]]:
        with unit_of_work(self._sessions, self._who) as db:
            hits, _ = search_items(db, self._who, query, namespace, min(limit, MAX_PAGE))
            return [item_dict(h.item) | {"score": round(h.score, 4)} for h in hits]
