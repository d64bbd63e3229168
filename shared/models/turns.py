"""Sessions, turns, checkpoints and messages: the source of truth for every conversation.

Every row that holds user data carries both ``tenant_id`` and ``user_id`` (the
principal), so every query can be scoped to it.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from shared.clock import utcnow
from shared.enums import StrValueEnum
from shared.models.base import Base, BigId, JSONType, new_id


class TurnStatus(StrValueEnum):
    """A turn's status, in OpenAI's words (DESIGN section 3). Compares equal to its string."""

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    REQUIRES_ACTION = "requires_action"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    INCOMPLETE = "incomplete"


TERMINAL = frozenset({TurnStatus.COMPLETED, TurnStatus.FAILED, TurnStatus.CANCELLED, TurnStatus.EXPIRED,
                      TurnStatus.INCOMPLETE})
ACTIVE = frozenset({TurnStatus.QUEUED, TurnStatus.IN_PROGRESS, TurnStatus.REQUIRES_ACTION})

class AgentSession(Base):
    """One conversation between one user and one agent."""

    __tablename__ = "sessions"
    __table_args__ = (
        Index("ix_sessions_owner", "tenant_id", "user_id", "created_at"),
        Index("ix_sessions_updated", "updated_at"),  # idle-session expiry
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ses"))
    tenant_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(256))
    agent: Mapped[str] = mapped_column(String(200))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    # The turn that owns the session right now (running or paused); NULL when idle.
    active_turn_id: Mapped[str | None] = mapped_column(String(40))
    turn_count: Mapped[int] = mapped_column(Integer, default=0)
    # The highest event cursor the session's log is known to have issued: an event log found
    # below it (Redis restored from an older snapshot) starts a new era above it (shared/streaming).
    event_cursor: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # UTF-8 bytes of every turn input kept in the session: what its user's history quota counts.
    input_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Turn(Base):
    """One input and everything the agent does in answer."""

    __tablename__ = "turns"
    __table_args__ = (
        UniqueConstraint("tenant_id", "user_id", "idempotency_key", name="uq_turns_idempotency"),
        Index("ix_turns_session", "session_id", "seq"),
        Index("ix_turns_status", "status", "lease_expires_at"),
        Index("ix_turns_scheduled", "scheduled_at", postgresql_where=text("status = 'queued'"),
              sqlite_where=text("status = 'queued'")),
        Index("ix_turns_schedule", "schedule_id", "created_at"),
        # The queued- and running-turn caps count these few rows (per user, per tenant).
        Index("ix_turns_active_owner", "tenant_id", "user_id", "status",
              postgresql_where=text("status IN ('queued', 'in_progress')"),
              sqlite_where=text("status IN ('queued', 'in_progress')")),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("turn"))
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(256))
    seq: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default=TurnStatus.QUEUED)
    input: Mapped[str] = mapped_column(Text)
    on_busy: Mapped[str] = mapped_column(String(20), default="enqueue")
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    output: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    usage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # What a paused turn waits for, and what the user answered.
    pending: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    resume: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # Committed steps so far; the step task for step N carries N and is stale once this moves on.
    step_count: Mapped[int] = mapped_column(Integer, default=0)
    # Claims of the current step; > 1 means an earlier attempt died or was handed back.
    step_attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts of the current step that died (lease lapsed) or failed (transient model error);
    # hand-backs do not count. STEPRUN_MAX_ATTEMPTS is checked against it.
    step_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Fencing number: bumped by every claim; a commit must present the current one.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Wall-time deadline (STEPRUN_TURN_TIME_LIMIT), pushed back by time spent paused.
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the turn entered requires_action, and when that pause expires.
    paused_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    action_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Why the current step's last attempt did not finish (shown in step.retrying).
    retry_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A delayed turn waits (queued, not the session's active turn) until this time.
    scheduled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The schedule that started this turn, if one did.
    schedule_id: Mapped[str | None] = mapped_column(String(40))


class Checkpoint(Base):
    """The session's agent state after a committed step. Append-only, numbered per session."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("session_id", "number", name="uq_checkpoints_number"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(256))
    number: Mapped[int] = mapped_column(Integer)
    turn_id: Mapped[str] = mapped_column(String(40))
    step: Mapped[int] = mapped_column(Integer)
    state: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Message(Base):
    """One entry of the conversation history, as a user reads it."""

    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_session", "session_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(256))
    turn_id: Mapped[str] = mapped_column(String(40))
    step: Mapped[int | None] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(20))
    content: Mapped[str] = mapped_column(Text, default="")
    tool_calls: Mapped[list[Any] | None] = mapped_column(JSONType)
    tool_call_id: Mapped[str | None] = mapped_column(String(200))
    name: Mapped[str | None] = mapped_column(String(200))
    # "complete", or "cancelled" for the partial output of a cancelled step.
    status: Mapped[str] = mapped_column(String(20), default="complete")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StreamEvent(Base):
    """An event that changes what a client believes (DESIGN section 5), kept with the commit that made it.

    Written in the same transaction as the step (or status change) it reports, so it
    exists exactly when that change does; published to the session's event log after
    the commit and republished from here whenever the log may have lost it
    (``published_at`` NULL, a Redis that lost its data, a reader finding its cursor gone).
    The log appends each id at most once.
    """

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_session", "session_id", "created_at"),
        Index("ix_events_unpublished", "created_at", postgresql_where=text("published_at IS NULL"),
              sqlite_where=text("published_at IS NULL")),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ev"))
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(256))
    turn_id: Mapped[str | None] = mapped_column(String(40))
    type: Mapped[str] = mapped_column(String(40))
    # The event as the log stores it (encode_event): republished byte for byte.
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
