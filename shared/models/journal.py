"""What a step did that must not be done twice: the model's response, each tool call, and usage.

- :class:`ModelCall`: the model's response for one step (text, tool calls with
  their ids, usage), recorded before its tools run. A retried attempt of the step
  reuses it instead of calling the model again, so it sees the same tool calls
  and the tools get the same idempotency keys.
- :class:`ToolCall`: the tool-call journal. A row is committed before the tool
  runs and its result as soon as the tool returns; a row left ``started`` by a
  dead attempt is a call whose outcome nobody knows.
- :class:`UsageCounter`: tokens, model calls and tool calls per principal per
  day and per month, which the budgets are checked against.

Every write of the first two is fenced by the turn's ``attempt``, like the
step's commit (shared/engine/journal.py).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.clock import utcnow
from shared.models.base import Base, BigId, JSONType


class ModelCall(Base):
    """The model's answer for one step of one turn, once it is known."""

    __tablename__ = "model_calls"
    __table_args__ = (
        UniqueConstraint("turn_id", "step", name="uq_model_calls_step"),
        Index("ix_model_calls_inflight", "tenant_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    turn_id: Mapped[str] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(256))
    step: Mapped[int] = mapped_column(Integer)
    # The fencing number of the attempt that called the model (or calls it now).
    attempt: Mapped[int] = mapped_column(Integer)
    # "started": a call is in flight (or died with its attempt); "recorded": ``response`` holds it.
    status: Mapped[str] = mapped_column(String(16), default="started")
    # Model calls made for this step, over all its attempts.
    calls: Mapped[int] = mapped_column(Integer, default=1)
    # {"text", "tool_calls": [{"id", "name", "arguments"}], "usage": {...}, "finish_reason"}
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    recorded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ToolCall(Base):
    """One tool call of one step: started before the tool runs, its result recorded when it returns."""

    __tablename__ = "tool_calls"
    __table_args__ = (UniqueConstraint("turn_id", "step", "call_id", name="uq_tool_calls_call"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    turn_id: Mapped[str] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(256))
    step: Mapped[int] = mapped_column(Integer)
    call_id: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str] = mapped_column(String(400))
    # The fencing number of the attempt that last started it.
    attempt: Mapped[int] = mapped_column(Integer)
    # started (outcome unknown until recorded) | succeeded | failed (the tool raised) | skipped
    status: Mapped[str] = mapped_column(String(16), default="started")
    # Times the tool was executed (a re-run of an idempotent tool, or a retry the user chose).
    runs: Mapped[int] = mapped_column(Integer, default=1)
    output: Mapped[str | None] = mapped_column(Text)
    error: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class UsageCounter(Base):
    """One principal's spending in one period (a UTC day or a UTC month)."""

    __tablename__ = "usage_counters"

    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)  # "day" | "month"
    starts_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    model_calls: Mapped[int] = mapped_column(Integer, default=0)
    tool_calls: Mapped[int] = mapped_column(Integer, default=0)
    # The largest single model call of the period: what a call about to start may cost.
    max_call_tokens: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
