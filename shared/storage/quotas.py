"""Storage quotas per user and per tenant: knowledge documents (count and bytes), memory items, turn history.

Each check is one statement on the system path (a tenant's total adds up every
user's rows, which the principal's own scope cannot see), run before the write's
own transaction takes its connection; a write that would pass a quota is refused
with 413 ``quota_exceeded`` naming the quota, its limit and what is used, and
writes nothing. Deleting (documents, memory items, sessions) frees room at once.
New documents and memory items of one tenant are written one at a time while a
quota is on (:func:`shared.db.serialise` in the writing transaction, then the
count), so writes at once cannot pass a quota together; a document is also
checked before it is chunked and embedded, so a full quota costs no embedding.
Turn input is counted in the new turn's transaction without that lock: turns
created at once may pass the history quota by their own size. A limit of 0
turns that quota off; with all of them off nothing runs.

Cost: the document and memory checks count the owner's rows (a tenant's: every
row of the tenant, an index scan for memory items), so they grow with what is
stored, up to the quota; they run on writes only. The history quota sums
``sessions.input_bytes`` (kept as turns are created) over the user's sessions;
it is counted in the new turn's own transaction (shared/turns/service.py
``admission_counts``: the user's own rows under the user's scope, the tenant's
through ``steprun_tenant_admission``, migration 0021), not on the system path.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, cast, func, or_, select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import LargeBinary

from shared.auth.principal import SYSTEM, Principal
from shared.clock import utcnow
from shared.db import serialise, unit_of_work
from shared.errors import QuotaExceeded
from shared.metrics import QUOTA_REFUSALS
from shared.models import AgentSession, KnowledgeDocument, MemoryItem, table_of
from shared.settings import Settings


def byte_length(db: Session, column: Any) -> ColumnElement[int]:
    """The UTF-8 size of a text column (Postgres reads it from the value's header, without detoasting)."""
    if db.get_bind().dialect.name == "postgresql":
        return func.octet_length(column)
    return func.length(cast(column, LargeBinary))


def _refuse(what: str, setting: str, used: int, adding: int, limit: int, field: str) -> QuotaExceeded:
    QUOTA_REFUSALS.labels(quota=setting.removeprefix("STEPRUN_QUOTA_").lower()).inc()
    return QuotaExceeded(f"quota exceeded: {what} ({setting}={limit}; {used} used, this adds {adding}); "
                         "delete some to make room", field=field)


def check_document(sessions: sessionmaker[Session], settings: Settings, who: Principal, size: int,
                   *, tenant_wide: bool) -> None:
    """A new document of ``size`` bytes: within the user's (unless tenant-wide) and the tenant's quotas?"""
    user_count, user_bytes = settings.quota_user_documents, settings.quota_user_document_bytes
    tenant_count, tenant_bytes = settings.quota_tenant_documents, settings.quota_tenant_document_bytes
    if tenant_wide:
        user_count = user_bytes = 0
    if not (user_count or user_bytes or tenant_count or tenant_bytes):
        return
    with unit_of_work(sessions, SYSTEM) as db:
        size_of = byte_length(db, KnowledgeDocument.text)
        mine = KnowledgeDocument.user_id == who.user_id
        row = db.execute(select(
            func.count().filter(mine), func.coalesce(func.sum(size_of).filter(mine), 0),
            func.count(), func.coalesce(func.sum(size_of), 0),
        ).where(KnowledgeDocument.tenant_id == who.tenant_id)).one()
    used = [int(v) for v in row]
    for limit, value, adding, what, setting in (
        (user_count, used[0], 1, "your knowledge documents", "STEPRUN_QUOTA_USER_DOCUMENTS"),
        (user_bytes, used[1], size, "the bytes of your knowledge documents", "STEPRUN_QUOTA_USER_DOCUMENT_BYTES"),
        (tenant_count, used[2], 1, "your tenant's knowledge documents", "STEPRUN_QUOTA_TENANT_DOCUMENTS"),
        (tenant_bytes, used[3], size, "the bytes of your tenant's knowledge documents",
         "STEPRUN_QUOTA_TENANT_DOCUMENT_BYTES"),
    ):
        if limit and value + adding > limit:
            raise _refuse(what, setting, value, adding, limit, "text")


def serialise_new_documents(db: Session, settings: Settings, who: Principal) -> None:
    """With a document quota on: the tenant's new documents are written one at a time until ``db``'s
    transaction ends. Take it in the writing transaction, then :func:`check_document` again: the count
    then sees every document written before it, and uploads at once cannot pass a quota together."""
    if (settings.quota_user_documents or settings.quota_user_document_bytes or settings.quota_tenant_documents
            or settings.quota_tenant_document_bytes):
        serialise(db, f"steprun:documents:{who.tenant_id}")


def serialise_new_memory_items(db: Session, settings: Settings, who: Principal) -> None:
    """With a memory item quota on: the tenant's memory writes one at a time until ``db``'s transaction
    ends. Take it in the writing transaction, before :func:`check_memory_item`: the count then sees every
    item written before it. (Two tools writing at once both counted before either wrote, and the user went
    past the quota.)"""
    if settings.quota_user_memory_items or settings.quota_tenant_memory_items:
        serialise(db, f"steprun:memory:{who.tenant_id}")


def check_memory_item(sessions: sessionmaker[Session], settings: Settings, who: Principal, namespace: str,
                      key: str) -> None:
    """Writing (namespace, key): replacing an item is always allowed; a new one must fit the item quotas."""
    user_limit, tenant_limit = settings.quota_user_memory_items, settings.quota_tenant_memory_items
    if not (user_limit or tenant_limit):
        return
    now: datetime = utcnow()
    live = or_(MemoryItem.expires_at.is_(None), MemoryItem.expires_at > now)
    mine = MemoryItem.user_id == who.user_id
    this = mine & (MemoryItem.namespace == namespace) & (MemoryItem.key == key)
    with unit_of_work(sessions, SYSTEM) as db:
        row = db.execute(select(func.count().filter(mine), func.count(), func.count().filter(this))
                         .where(MemoryItem.tenant_id == who.tenant_id, live)).one()
    user_used, tenant_used, exists = (int(v) for v in row)
    if exists:
        return
    if user_limit and user_used + 1 > user_limit:
        raise _refuse("your memory items", "STEPRUN_QUOTA_USER_MEMORY_ITEMS", user_used, 1, user_limit, "value")
    if tenant_limit and tenant_used + 1 > tenant_limit:
        raise _refuse("your tenant's memory items", "STEPRUN_QUOTA_TENANT_MEMORY_ITEMS", tenant_used, 1,
                      tenant_limit, "value")


def history_columns(settings: Settings, tenant_id: Any, user_id: Any, *, tenant: bool = True) -> list[Any]:
    """The history quotas' usage, as labelled scalar subqueries for the new turn's one statement
    (``tenant=False``: the user's own only, which the user's scope may read). ``tenant_id`` and ``user_id``:
    values, or bound parameters of a statement built once."""
    parts: list[Any] = []
    sessions = table_of(AgentSession)  # Core columns: no ORM compile state in the POST's statement
    if settings.quota_user_history_bytes > 0:
        parts.append(select(func.coalesce(func.sum(sessions.c.input_bytes), 0))
                     .where(sessions.c.tenant_id == tenant_id, sessions.c.user_id == user_id)
                     .scalar_subquery().label("user_history"))
    if tenant and settings.quota_tenant_history_bytes > 0:
        parts.append(select(func.coalesce(func.sum(sessions.c.input_bytes), 0))
                     .where(sessions.c.tenant_id == tenant_id).scalar_subquery().label("tenant_history"))
    return parts


def check_history(settings: Settings, used: dict[str, int], adding: int) -> None:
    for label, limit, what, setting in (
        ("user_history", settings.quota_user_history_bytes, "the bytes of turn input your sessions keep",
         "STEPRUN_QUOTA_USER_HISTORY_BYTES"),
        ("tenant_history", settings.quota_tenant_history_bytes, "the bytes of turn input your tenant's sessions "
         "keep", "STEPRUN_QUOTA_TENANT_HISTORY_BYTES"),
    ):
        if label in used and used[label] + adding > limit:
            raise _refuse(what, setting, used[label], adding, limit, "input")
