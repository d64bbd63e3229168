"""Rows as the JSON a client reads."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from shared.models import AgentSession, Message, Turn


def ts(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat().replace("+00:00", "Z")


def session_json(row: AgentSession) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "session",
        "agent": row.agent,
        "metadata": row.metadata_,
        "active_turn_id": row.active_turn_id,
        "created_at": ts(row.created_at),
        "updated_at": ts(row.updated_at),
    }


def turn_json(row: Turn) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "turn",
        "session_id": row.session_id,
        "status": row.status,
        "input": row.input,
        "output": row.output or "",
        "error": row.error,
        "usage": row.usage or {},
        "steps": row.step_count,
        "pending": row.pending if row.status == "requires_action" else None,
        "cancel_requested": row.cancel_requested,
        "created_at": ts(row.created_at),
        "started_at": ts(row.started_at),
        "finished_at": ts(row.finished_at),
        "scheduled_at": ts(row.scheduled_at),
        "schedule_id": row.schedule_id,
    }


def message_json(row: Message) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": row.id,
        "object": "message",
        "turn_id": row.turn_id,
        "role": row.role,
        "content": row.content,
        "status": row.status,
        "created_at": ts(row.created_at),
    }
    if row.tool_calls:
        body["tool_calls"] = row.tool_calls
    if row.tool_call_id:
        body["tool_call_id"] = row.tool_call_id
        body["name"] = row.name
    return body
