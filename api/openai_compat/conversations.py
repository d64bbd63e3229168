"""OpenAI's Conversations API over steprun's sessions (DESIGN 10.1)."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from api.context import db, json_body, principal, runtime
from api.openai_compat import errors
from api.openai_compat.inputs import MAX_ITEMS, message
from api.openai_compat.listing import list_json
from api.openai_compat.objects import conversation_json
from api.openai_compat.store import conversation, conversation_items
from shared.errors import BadInput
from shared.turns import conversations
from shared.turns import service as turns

bp = Blueprint("openai_conversations", __name__, url_prefix="/v1/conversations")
errors.install(bp)


def _seed(items: Any) -> list[dict[str, str]]:
    if items is None:
        return []
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        raise BadInput(f"'items' must be a list of at most {MAX_ITEMS} message items", field="items")
    out = []
    for i, item in enumerate(items):
        where = f"items[{i}]"
        if not isinstance(item, dict) or (item.get("type") or "message") != "message":
            kind = item.get("type") if isinstance(item, dict) else None
            raise BadInput(f"{where}: items of type {kind!r} are not supported here; send message items",
                           field=where)
        out.append(message(item, where))
    return out


@bp.post("")
def create_conversation() -> Response:
    body = json_body()
    row = conversations.create_conversation(db(), runtime(), principal(), body.get("metadata"),
                                            _seed(body.get("items")))
    db().commit()
    return jsonify(conversation_json(row))


@bp.get("/<conversation_id>")
def get_conversation(conversation_id: str) -> Response:
    return jsonify(conversation_json(conversation(db(), principal(), conversation_id)))


@bp.post("/<conversation_id>")
def update_conversation(conversation_id: str) -> Response:
    body = json_body()
    row = conversation(db(), principal(), conversation_id)
    conversations.update_metadata(db(), runtime(), row, body.get("metadata"))
    db().commit()
    return jsonify(conversation_json(row))


@bp.delete("/<conversation_id>")
def delete_conversation(conversation_id: str) -> Response:
    row = conversation(db(), principal(), conversation_id)
    turns.delete_session(db(), runtime(), principal(), row.id)
    db().commit()
    return jsonify({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


@bp.get("/<conversation_id>/items")
def list_items(conversation_id: str) -> Response:
    row = conversation(db(), principal(), conversation_id)
    return jsonify(list_json(conversation_items(db(), runtime(), principal(), row), default_order="desc"))
