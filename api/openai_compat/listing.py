"""OpenAI's list shape: ``{"object": "list", data, first_id, last_id, has_more}`` with after/limit/order."""
from __future__ import annotations

from typing import Any

from flask import request

from api.context import int_arg
from shared.errors import BadInput

MAX_LIMIT = 100


def list_json(items: list[dict[str, Any]], *, default_order: str) -> dict[str, Any]:
    """One page of ``items`` (oldest first as given) per the request's ``order``, ``after`` and ``limit``."""
    order = request.args.get("order", default_order)
    if order not in ("asc", "desc"):
        raise BadInput("'order' must be asc or desc", field="order")
    limit = int_arg("limit", 20, lo=1, hi=MAX_LIMIT)
    ordered = items if order == "asc" else list(reversed(items))
    after = request.args.get("after")
    if after:
        positions = [i for i, item in enumerate(ordered) if item.get("id") == after]
        if not positions:
            raise BadInput(f"'after' {after!r} is not an item of this list", field="after")
        ordered = ordered[positions[0] + 1:]
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}
