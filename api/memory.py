"""The user's long-term memory: PUT/GET/DELETE one item, list or search many."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from api.context import db, int_arg, json_body, principal, reject_empty_args, runtime
from api.serialize import ts
from shared.errors import BadInput
from shared.models import MemoryItem
from shared.storage import memory
from shared.streaming.protocol import MAX_CURSOR

bp = Blueprint("memory", __name__, url_prefix="/v1/memory")


def memory_json(row: MemoryItem, score: float | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "object": "memory",
        "namespace": row.namespace,
        "key": row.key,
        "value": row.value,
        "expires_at": ts(row.expires_at),
        "created_at": ts(row.created_at),
        "updated_at": ts(row.updated_at),
    }
    if score is not None:
        body["score"] = round(score, 6)
    return body


@bp.put("/<namespace>/<key>")
def put_item(namespace: str, key: str):  # type: ignore[no-untyped-def]
    body = json_body()
    if "value" not in body:
        raise BadInput("'value' is required (any JSON)", field="value")
    row, created = memory.put_item(db(), runtime().settings, principal(), namespace, key, body["value"],
                                   body.get("ttl_seconds"))
    db().commit()
    return jsonify(memory_json(row)), (201 if created else 200)


@bp.get("/<namespace>/<key>")
def get_item(namespace: str, key: str):  # type: ignore[no-untyped-def]
    return jsonify(memory_json(memory.get_item(db(), principal(), namespace, key)))


@bp.delete("/<namespace>/<key>")
def delete_item(namespace: str, key: str):  # type: ignore[no-untyped-def]
    memory.delete_item(db(), principal(), namespace, key)
    db().commit()
    return jsonify({"object": "memory", "namespace": namespace, "key": key, "deleted": True})


@bp.get("")
def list_items():  # type: ignore[no-untyped-def]
    """Newest first; with ``q``, best match first. ``next`` is an opaque cursor for ``after``."""
    reject_empty_args("limit", "after")
    limit = int_arg("limit", 20, lo=1, hi=memory.MAX_PAGE)
    after = int_arg("after", 0, lo=0, hi=MAX_CURSOR)
    namespace = request.args.get("namespace") or None
    if namespace is not None and not memory.NAMESPACE_RE.match(namespace):
        raise BadInput("namespace must be 1-128 characters of letters, digits and _ . : -", field="namespace")
    q = request.args.get("q", "").replace("\x00", " ")
    if len(q) > 1000:
        raise BadInput("'q' is longer than 1000 characters", field="q")
    if q.strip():
        hits, nxt = memory.search_items(db(), principal(), q, namespace, limit, offset=after)
        return jsonify({"data": [memory_json(h.item, h.score) for h in hits], "next": nxt})
    rows, nxt = memory.list_items(db(), principal(), namespace, limit, after or None)
    return jsonify({"data": [memory_json(r) for r in rows], "next": nxt})
