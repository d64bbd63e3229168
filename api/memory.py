"""The user's long-term memory: PUT/GET/DELETE one item, list or search many."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from api.context import db, int_arg, json_body, principal, reject_empty_args, runtime
from api.openapi import AFTER_PAGE, LIMIT, OBJ, SEARCH_Q, TS, RouteDocs, op, page, query, ref
from api.serialize import ts
from shared.errors import BadInput
from shared.models import MemoryItem
from shared.storage import memory, quotas
from shared.streaming.protocol import MAX_CURSOR

bp = Blueprint("memory", __name__, url_prefix="/v1/memory")

NS = {"name": "namespace", "in": "path", "required": True,
      "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"}}
KEY = {"name": "key", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": "^[^/\\x00-\\x1f]{1,256}$"}}


def describe() -> RouteDocs:
    return RouteDocs({
        "/v1/memory/{namespace}/{key}": {
            "put": op("Create (201) or replace (200) a memory item", "200", ref("Memory"), body="MemoryPut",
                      params=[NS, KEY], errors=("400", "401", "413", "429"), also={"201": "created"}),
            "get": op("One memory item", "200", ref("Memory"), params=[NS, KEY]),
            "delete": op("Delete a memory item", "200", OBJ, params=[NS, KEY]),
        },
        "/v1/memory": {"get": op("Your memory, newest first; with q, best match first", "200", page("Memory"),
                                 params=[query("namespace", {"type": "string"}), SEARCH_Q, LIMIT, AFTER_PAGE])},
    }, schemas={
        "Memory": {"type": "object", "required": ["namespace", "key", "value"], "properties": {
            "object": {"const": "memory"}, "namespace": {"type": "string"}, "key": {"type": "string"}, "value": {},
            "expires_at": TS, "created_at": TS, "updated_at": TS, "score": {"type": "number"}}},
        "MemoryPut": {"type": "object", "required": ["value"], "properties": {
            "value": {"description": "any JSON"},
            "ttl_seconds": {"type": ["integer", "null"], "minimum": 1, "description": "null or absent: no expiry"}}},
    })


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
def put_item(namespace: str, key: str) -> tuple[Response, int]:
    body = json_body()
    if "value" not in body:
        raise BadInput("'value' is required (any JSON)", field="value")
    memory.check_address(namespace, key)
    rt = runtime()
    quotas.check_memory_item(rt.sessions, rt.settings, principal(), namespace, key)
    row, created = memory.put_item(db(), rt.settings, principal(), namespace, key, body["value"],
                                   body.get("ttl_seconds"))
    db().commit()
    return jsonify(memory_json(row)), (201 if created else 200)


@bp.get("/<namespace>/<key>")
def get_item(namespace: str, key: str) -> Response:
    return jsonify(memory_json(memory.get_item(db(), principal(), namespace, key)))


@bp.delete("/<namespace>/<key>")
def delete_item(namespace: str, key: str) -> Response:
    memory.delete_item(db(), principal(), namespace, key)
    db().commit()
    return jsonify({"object": "memory", "namespace": namespace, "key": key, "deleted": True})


@bp.get("")
def list_items() -> Response:
    """Newest first; with ``q``, best match first. ``next`` is an opaque cursor for ``after``."""
    reject_empty_args("limit", "after")
    limit = int_arg("limit", 20, lo=1, hi=memory.MAX_PAGE)
    after = int_arg("after", 0, lo=0, hi=MAX_CURSOR)
    namespace = request.args.get("namespace") or None
    if namespace is not None and not memory.NAMESPACE_RE.fullmatch(namespace):
        raise BadInput("namespace must be 1-128 characters of letters, digits and _ . : -", field="namespace")
    q = request.args.get("q", "").replace("\x00", " ")
    if len(q) > 1000:
        raise BadInput("'q' is longer than 1000 characters", field="q")
    if q.strip():
        hits, nxt = memory.search_items(db(), principal(), q, namespace, limit, offset=after)
        return jsonify({"data": [memory_json(h.item, h.score) for h in hits], "next": nxt})
    rows, nxt = memory.list_items(db(), principal(), namespace, limit, after or None)
    return jsonify({"data": [memory_json(r) for r in rows], "next": nxt})
