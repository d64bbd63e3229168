"""The outbox: a turn's webhook event, written in the transaction that changes the turn's state.

:func:`record_turn_event` is called by :mod:`shared.turns.transitions` (finish and
pause) inside the state change's transaction: the event commits with it or not at
all, so a crash never loses one and a rolled-back (or fenced-out zombie) change
never invents one. The scheduler fans each row out to the tenant's endpoints.
"""
from __future__ import annotations

import json
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db import write_later
from shared.models import Turn, WebhookEvent, new_id, table_of

# A turn's status -> the event its end (or pause) sends. A response id is a turn id.
STATUS_EVENTS = {
    "completed": "response.completed",
    "failed": "response.failed",
    "cancelled": "response.cancelled",
    "incomplete": "response.incomplete",
    # OpenAI has no "expired" response event: a pause nobody answered in time ended the turn unfinished.
    "expired": "response.failed",
    "requires_action": "response.requires_action",
}
EVENT_TYPES = ("response.completed", "response.failed", "response.cancelled", "response.incomplete",
               "response.requires_action")


def event_body(event_id: str, event_type: str, created_at: int, object_id: str) -> str:
    """The JSON body of one event, as OpenAI sends it; the exact text is what gets signed."""
    return json.dumps({"id": event_id, "object": "event", "type": event_type, "created_at": created_at,
                       "data": {"id": object_id}}, separators=(",", ":"))


def record_turn_event(db: Session, turn: Turn, status: str) -> None:
    """Add the webhook event of ``turn`` entering ``status`` to the current transaction."""
    row = turn_event_row(turn.id, turn.tenant_id, turn.user_id, status)
    if row is not None:
        db.add(WebhookEvent(**row))


def insert_turn_event(db: Session, turn_id: str, tenant_id: str, user_id: str, status: str) -> None:
    """:func:`record_turn_event` as one Core INSERT, for a caller holding no ORM object of the turn (the step's
    commit)."""
    row = turn_event_row(turn_id, tenant_id, user_id, status)
    if row is not None:
        write_later(db, _INSERT, row)


def turn_event_row(turn_id: str, tenant_id: str, user_id: str, status: str) -> dict[str, Any] | None:
    """The outbox row of a turn entering ``status``; None if that status sends no event."""
    event_type = STATUS_EVENTS.get(str(status))
    if event_type is None:
        return None
    now = utcnow()
    event_id = new_id("evt")
    return {"id": event_id, "tenant_id": tenant_id, "user_id": user_id, "type": event_type, "turn_id": turn_id,
            "body": event_body(event_id, event_type, int(now.timestamp()), turn_id), "created_at": now}


_INSERT = insert(table_of(WebhookEvent))
