"""Models of the storage primitives: long-term memory, knowledge documents and traces.

Imported by :mod:`shared.models` so that ``Base.metadata`` knows these tables
wherever the models are loaded. The schema itself comes from
migration 0002, which also adds what SQLAlchemy does not model here:

- on Postgres, a generated ``tsv tsvector`` column and a GIN index on
  ``memory_items`` and ``knowledge_chunks`` (full-text search);
- on SQLite, an FTS5 table ``knowledge_chunks_fts`` kept in step by triggers.

Those columns are deliberately absent from the classes: the ORM never writes
them (the database computes them) and SQLite has no such column, so the
search code names them in SQL only.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.clock import utcnow
from shared.models.base import Base, BigId, JSONType, new_id


class MemoryItem(Base):
    """One value in a user's long-term memory, addressed by (namespace, key)."""

    __tablename__ = "memory_items"
    __table_args__ = (
        UniqueConstraint("tenant_id", "user_id", "namespace", "key", name="uq_memory_items_key"),
        Index("ix_memory_items_expires", "expires_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(256))
    namespace: Mapped[str] = mapped_column(String(128))
    key: Mapped[str] = mapped_column(String(256))
    value: Mapped[Any] = mapped_column(JSONType)
    # The value's words (strings and numbers, flattened) plus the key: what search matches.
    text: Mapped[str] = mapped_column(Text, default="")
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class KnowledgeDocument(Base):
    """A document agents can search. ``user_id`` is NULL for a tenant-wide document."""

    __tablename__ = "knowledge_documents"
    __table_args__ = (Index("ix_knowledge_documents_owner", "tenant_id", "user_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("doc"))
    tenant_id: Mapped[str] = mapped_column(String(128))
    # A tenant-wide document belongs to no user: erasing a user keeps it.
    user_id: Mapped[str | None] = mapped_column(String(256))
    scope: Mapped[str] = mapped_column(String(10))  # "user" | "tenant"
    title: Mapped[str] = mapped_column(String(300))
    format: Mapped[str] = mapped_column(String(20))  # "text" | "markdown"
    text: Mapped[str] = mapped_column(Text)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class KnowledgeChunk(Base):
    """A searchable piece of a document. Owner columns are copied so search needs no join to scope."""

    __tablename__ = "knowledge_chunks"
    __table_args__ = (
        Index("ix_knowledge_chunks_document", "document_id", "position"),
        Index("ix_knowledge_chunks_owner", "tenant_id", "user_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    document_id: Mapped[str] = mapped_column(ForeignKey("knowledge_documents.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str | None] = mapped_column(String(256))
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    # Set only when an embedder is configured (STEPRUN_EMBEDDER).
    embedding: Mapped[list[Any] | None] = mapped_column(JSONType)


class TraceSpan(Base):
    """One timed unit of a turn: a step, a model call inside it, or a tool call."""

    __tablename__ = "trace_spans"
    __table_args__ = (Index("ix_trace_spans_turn", "turn_id", "id"), Index("ix_trace_spans_session", "session_id"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(256))
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    turn_id: Mapped[str] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    # W3C/OpenTelemetry-shaped ids (16 hex digits), so an exporter can reuse them.
    span_id: Mapped[str] = mapped_column(String(32))
    parent_span_id: Mapped[str | None] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(20))  # "step" | "model" | "tool"
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))  # "ok" | "error" | "cancelled"
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[float] = mapped_column(Float)
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
