"""The API described as OpenAPI 3.1, served at GET /openapi.json.

Written by hand next to the routes, so that the descriptions say what a client
needs, errors included: each route module has a ``describe()`` returning the
:class:`RouteDocs` of its blueprint. ``create_app`` registers each blueprint
together with its description in an :class:`OpenAPIRegistry` and builds the
document once, from that registry (a test checks every route is described).
This module holds the registry, the helpers the descriptions are written
with, and the schemas several modules refer to.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from shared.streaming.protocol import MAX_CURSOR

bp = Blueprint("openapi", __name__)

# Where create_app keeps the built document (app.extensions).
EXTENSION = "steprun.openapi"

TS = {"type": ["string", "null"], "format": "date-time"}
ID = {"type": "string", "maxLength": 64}
OBJ = {"type": "object"}


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def page(item: str) -> dict[str, Any]:
    return {"type": "object", "required": ["data", "next"],
            "properties": {"data": {"type": "array", "items": ref(item)},
                           "next": {"type": ["string", "integer", "null"]}}}


ERRORS = {
    "400": "bad input: the message names the field", "401": "no key, or a bad one",
    "403": "not allowed with this key (tenant-wide documents need a service key)",
    "404": "not found, or not yours", "409": "conflict", "410": "the cursor is older than the kept log",
    "413": "too large", "429": "over a limit (Retry-After)", "503": "a dependency is down (Retry-After)",
}


def json_response(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def op(summary: str, ok: str, schema: dict[str, Any], *, body: str | None = None,
       params: list[dict[str, Any]] | None = None, errors: tuple[str, ...] = ("400", "401", "404", "429"),
       secured: bool = True, content_type: str = "application/json",
       also: dict[str, str] | None = None) -> dict[str, Any]:
    """One operation: its success response(s), its errors, its parameters and body."""
    responses: dict[str, Any] = {ok: json_response(schema) if content_type == "application/json" else {
        "description": "OK", "content": {content_type: {"schema": schema}}}}
    for code, description in (also or {}).items():
        responses[code] = json_response(schema, description)
    for code in errors:
        responses[code] = json_response(ref("Error"), ERRORS[code])
    out: dict[str, Any] = {"summary": summary, "responses": responses, "parameters": params or []}
    if body:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(body)}}}
    if not secured:
        out["security"] = []
    return out


def path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "maxLength": 200}}


def query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def header(name: str, description: str, *, min_length: int = 1) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False,
            "schema": {"type": "string", "minLength": min_length, "maxLength": 256}, "description": description}


LIMIT = query("limit", {"type": "integer", "minimum": 1, "maximum": 100})
WAIT = query("wait", {"type": "number", "minimum": 0, "maximum": 60}, "long-poll up to this many seconds")
AFTER_INT = query("after", {"type": "integer", "minimum": 0, "maximum": MAX_CURSOR}, "cursor")
SID, TID = path_param("session_id"), path_param("turn_id")
AFTER_PAGE = query("after", {"type": "string"}, "the previous page's next")
# No maxLength here: the API answers 400 past 1000 characters, and a fuzzer told of a limit sends
# URLs longer than the server's request line (414, before the app sees them).
SEARCH_Q = query("q", {"type": "string"}, "words to search for (at most 1000 characters)")


def common_schemas() -> dict[str, Any]:
    """The schemas several route modules refer to (every error, and the objects streams and lists carry)."""
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                           "field": {"type": "string"}}}}},
        "Session": {"type": "object", "required": ["id", "agent", "metadata", "created_at", "updated_at"],
                    "properties": {
                        "id": ID, "object": {"const": "session"}, "agent": {"type": "string"},
                        "metadata": {"type": "object"}, "active_turn_id": {"type": ["string", "null"]},
                        "created_at": TS, "updated_at": TS}},
        "Turn": {"type": "object",
                 "required": ["id", "session_id", "status", "input", "output", "error", "usage", "created_at",
                              "started_at", "finished_at"],
                 "properties": {
                     "id": ID, "object": {"const": "turn"}, "session_id": ID,
                     "status": {"enum": ["queued", "in_progress", "requires_action", "completed", "failed",
                                         "cancelled", "expired", "incomplete"]},
                     "input": {"type": "string"}, "output": {"type": "string"},
                     "error": {"type": ["object", "null"]}, "usage": {"type": "object"},
                     "steps": {"type": "integer"}, "pending": {"type": ["object", "null"]},
                     "cancel_requested": {"type": "boolean"},
                     "created_at": TS, "started_at": TS, "finished_at": TS, "scheduled_at": TS,
                     "schedule_id": {"type": ["string", "null"]}}},
        "Message": {"type": "object", "required": ["id", "role", "content"], "properties": {
            "id": {"type": "integer"}, "object": {"const": "message"}, "turn_id": ID,
            "role": {"enum": ["user", "assistant", "tool", "system"]}, "content": {"type": "string"},
            "status": {"type": "string"}, "tool_calls": {"type": "array"}, "tool_call_id": {"type": "string"},
            "name": {"type": ["string", "null"]}, "created_at": TS}},
        "Event": {"type": "object", "required": ["cursor", "type", "turn_id", "data", "ts"], "properties": {
            "cursor": {"type": "integer"}, "type": {"type": "string"}, "turn_id": {"type": ["string", "null"]},
            "data": {"type": "object"}, "ts": {"type": "number"}}},
    }


@dataclass(frozen=True)
class RouteDocs:
    """What one blueprint serves: path -> method -> operation, and the schemas only it refers to."""

    paths: Mapping[str, Mapping[str, Any]]
    schemas: Mapping[str, Any] = field(default_factory=dict)


class OpenAPIRegistry:
    """The route descriptions of one app, collected as its blueprints are registered."""

    def __init__(self) -> None:
        self._paths: dict[str, dict[str, Any]] = {}
        self._schemas: dict[str, Any] = {}
        self.add(RouteDocs({}, common_schemas()))

    def add(self, docs: RouteDocs) -> None:
        for path, operations in docs.paths.items():
            described = self._paths.setdefault(path, {})
            for method, operation in operations.items():
                if method in described:
                    raise ValueError(f"{method.upper()} {path} is described twice")
                described[method] = operation
        for name, schema in docs.schemas.items():
            if name in self._schemas and self._schemas[name] != schema:
                raise ValueError(f"two different schemas are named {name!r}")
            self._schemas[name] = schema

    def document(self) -> dict[str, Any]:
        """The OpenAPI document; raises if an operation refers to a schema nobody registered."""
        paths, schemas = copy.deepcopy(self._paths), copy.deepcopy(self._schemas)
        missing = sorted({name for name in _refs([paths, schemas]) if name not in schemas})
        if missing:
            raise ValueError(f"schemas referred to but not registered: {', '.join(missing)}")
        return {
            "openapi": "3.1.0",
            "info": {"title": "steprun", "version": "1", "description": "The runtime layer for AI agents."},
            "servers": [{"url": "/"}],
            "security": [{"bearer": []}],
            "components": {"schemas": schemas,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "paths": paths,
        }


def _refs(value: Any) -> Iterator[str]:
    """The component schema names ``value`` refers to, at any depth."""
    prefix = "#/components/schemas/"
    if isinstance(value, dict):
        target = value.get("$ref")
        if isinstance(target, str) and target.startswith(prefix):
            yield target[len(prefix):]
        for item in value.values():
            yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def describe() -> RouteDocs:
    return RouteDocs({"/openapi.json": {"get": op("This document", "200", OBJ, errors=(), secured=False)}})


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(current_app.extensions[EXTENSION])
