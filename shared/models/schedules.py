"""Schedules: turns that start themselves, on a cron expression or every N seconds (DESIGN section 11.1).

A schedule belongs to one principal like every user-data row (row-level
security). The scheduler fires it when ``next_run_at`` has passed, advancing
``next_run_at`` in the transaction that creates the run's turn.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, DateTime, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.clock import utcnow
from shared.models.base import Base, JSONType, new_id


class Schedule(Base):
    """A recurring turn of one principal: ``input`` sent to ``agent`` on ``cron`` or every ``every_seconds``."""

    __tablename__ = "schedules"
    __table_args__ = (
        Index("ix_schedules_owner", "tenant_id", "user_id", "created_at"),
        Index("ix_schedules_due", "next_run_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("sched"))
    tenant_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(256))
    agent: Mapped[str] = mapped_column(String(200))
    input: Mapped[str] = mapped_column(Text)
    # Exactly one of the two is set.
    cron: Mapped[str | None] = mapped_column(String(200))
    every_seconds: Mapped[int | None] = mapped_column(Integer)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    # Runs go to this session; NULL: a new session per run.
    session_id: Mapped[str | None] = mapped_column(String(40))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    next_run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    run_count: Mapped[int] = mapped_column(Integer, default=0)
    # Why the last due run did not start (unknown agent, deleted session, a limit), if it did not.
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
