"""The API described as OpenAPI 3.1, served at GET /openapi.json.

Written by hand next to the routes (a test checks every route is described)
so that the descriptions say what a client needs, errors included.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from shared.streaming.protocol import MAX_CURSOR

bp = Blueprint("openapi", __name__)

TS = {"type": ["string", "null"], "format": "date-time"}
ID = {"type": "string", "maxLength": 64}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _page(item: str) -> dict[str, Any]:
    return {"type": "object", "required": ["data", "next"],
            "properties": {"data": {"type": "array", "items": _ref(item)},
                           "next": {"type": ["string", "integer", "null"]}}}


SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}}}},
    "Session": {"type": "object", "required": ["id", "agent", "metadata", "created_at", "updated_at"], "properties": {
        "id": ID, "object": {"const": "session"}, "agent": {"type": "string"}, "metadata": {"type": "object"},
        "active_turn_id": {"type": ["string", "null"]}, "created_at": TS, "updated_at": TS}},
    "Turn": {"type": "object",
             "required": ["id", "session_id", "status", "input", "output", "error", "usage", "created_at",
                          "started_at", "finished_at"],
             "properties": {
                 "id": ID, "object": {"const": "turn"}, "session_id": ID,
                 "status": {"enum": ["queued", "in_progress", "requires_action", "completed", "failed", "cancelled",
                                     "expired", "incomplete"]},
                 "input": {"type": "string"}, "output": {"type": "string"},
                 "error": {"type": ["object", "null"]}, "usage": {"type": "object"},
                 "steps": {"type": "integer"}, "pending": {"type": ["object", "null"]},
                 "cancel_requested": {"type": "boolean"},
                 "created_at": TS, "started_at": TS, "finished_at": TS}},
    "Message": {"type": "object", "required": ["id", "role", "content"], "properties": {
        "id": {"type": "integer"}, "object": {"const": "message"}, "turn_id": ID,
        "role": {"enum": ["user", "assistant", "tool", "system"]}, "content": {"type": "string"},
        "status": {"type": "string"}, "tool_calls": {"type": "array"}, "tool_call_id": {"type": "string"},
        "name": {"type": ["string", "null"]}, "created_at": TS}},
    "Event": {"type": "object", "required": ["cursor", "type", "turn_id", "data", "ts"], "properties": {
        "cursor": {"type": "integer"}, "type": {"type": "string"}, "turn_id": {"type": ["string", "null"]},
        "data": {"type": "object"}, "ts": {"type": "number"}}},
    "EventPage": {"type": "object", "required": ["data", "next"], "properties": {
        "data": {"type": "array", "items": _ref("Event")}, "next": {"type": "integer"}}},
    "Agent": {"type": "object", "required": ["name", "tools"], "properties": {
        "name": {"type": "string"}, "description": {"type": "string"}, "model": {"type": "string"},
        "max_steps": {"type": "integer"}, "tools": {"type": "array", "items": {"type": "object"}}}},
    "SessionCreate": {"type": "object", "required": ["agent"], "properties": {
        "agent": {"type": "string", "minLength": 1}, "metadata": {"type": ["object", "null"]}}},
    "TurnCreate": {"type": "object", "required": ["input"], "properties": {
        "input": {"type": "string", "minLength": 1}, "on_busy": {"enum": ["enqueue", "reject", "interrupt"]}}},
    "Resume": {"type": "object", "properties": {
        "approve": {"type": "boolean"}, "input": {"type": "string"},
        "tool_outputs": {"type": "array", "items": {"type": "object", "required": ["id"],
                                                    "properties": {"id": {"type": "string"}, "output": {}}}}}},
}

ERRORS = {
    "400": "bad input: the message names the field", "401": "no key, or a bad one",
    "404": "not found, or not yours", "409": "conflict", "410": "the cursor is older than the kept log",
    "413": "too large", "429": "over a limit (Retry-After)", "503": "a dependency is down (Retry-After)",
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def op(summary: str, ok: str, schema: dict[str, Any], *, body: str | None = None,
       params: list[dict[str, Any]] | None = None, errors: tuple[str, ...] = ("400", "401", "404", "429"),
       secured: bool = True, content_type: str = "application/json",
       also: dict[str, str] | None = None) -> dict[str, Any]:
    """One operation: its success response(s), its errors, its parameters and body."""
    responses: dict[str, Any] = {ok: _json(schema) if content_type == "application/json" else {
        "description": "OK", "content": {content_type: {"schema": schema}}}}
    for code, description in (also or {}).items():
        responses[code] = _json(schema, description)
    for code in errors:
        responses[code] = _json(_ref("Error"), ERRORS[code])
    out: dict[str, Any] = {"summary": summary, "responses": responses, "parameters": params or []}
    if body:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    if not secured:
        out["security"] = []
    return out


def path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "maxLength": 200}}


def query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": 256}, "description": description}


LIMIT = query("limit", {"type": "integer", "minimum": 1, "maximum": 100})
WAIT = query("wait", {"type": "number", "minimum": 0, "maximum": 60}, "long-poll up to this many seconds")
AFTER_INT = query("after", {"type": "integer", "minimum": 0, "maximum": MAX_CURSOR}, "cursor")
SID, TID = path_param("session_id"), path_param("turn_id")
OBJ = {"type": "object"}


def build_paths() -> dict[str, Any]:
    return {
        "/healthz": {"get": op("Liveness", "200", OBJ, errors=(), secured=False)},
        "/readyz": {"get": op("Readiness: database and event log reachable", "200", OBJ, errors=("503",),
                              secured=False)},
        "/metrics": {"get": op("Prometheus metrics", "200", {"type": "string"}, errors=(), secured=False,
                               content_type="text/plain")},
        "/openapi.json": {"get": op("This document", "200", OBJ, errors=(), secured=False)},
        "/v1/agents": {"get": op("Agents served here", "200", _page("Agent"), errors=("401", "429"))},
        "/v1/sessions": {
            "post": op("Create a session", "201", _ref("Session"), body="SessionCreate",
                       errors=("400", "401", "413", "429")),
            "get": op("List your sessions, newest first", "200", _page("Session"),
                      params=[LIMIT, query("after", {"type": "string"})]),
        },
        "/v1/sessions/{session_id}": {
            "get": op("One session", "200", _ref("Session"), params=[SID]),
            "delete": op("Delete a session with its history", "200", OBJ, params=[SID]),
        },
        "/v1/sessions/{session_id}/messages": {
            "get": op("Conversation history, oldest first", "200", _page("Message"),
                      params=[SID, LIMIT, AFTER_INT])},
        "/v1/sessions/{session_id}/turns": {
            "post": op("Start a turn (202), or return the same one for a repeated Idempotency-Key (200)", "202",
                       _ref("Turn"), body="TurnCreate", errors=("400", "401", "404", "409", "413", "429"),
                       params=[SID, header("Idempotency-Key", "retries with the same key return the same turn")],
                       also={"200": "the turn an earlier request with this Idempotency-Key created"})},
        "/v1/sessions/{session_id}/events": {
            "get": op("Events after a cursor (polling clients)", "200", _ref("EventPage"),
                      errors=("400", "401", "404", "410", "429"),
                      params=[SID, AFTER_INT, WAIT, query("limit", {"type": "integer", "minimum": 1,
                                                                    "maximum": 1000})])},
        "/v1/turns/{turn_id}": {
            "get": op("A turn; wait long-polls for a terminal or paused status", "200", _ref("Turn"),
                      params=[TID, WAIT])},
        "/v1/turns/{turn_id}/cancel": {"post": op("Cancel (idempotent)", "200", _ref("Turn"), params=[TID])},
        "/v1/turns/{turn_id}/resume": {
            "post": op("Continue a requires_action turn", "202", _ref("Turn"), body="Resume",
                       errors=("400", "401", "404", "409", "429"), params=[TID])},
    }


EXTRA_PATHS: list[dict[str, Any]] = []  # other modules' blueprints add their descriptions here


def document(agent_names: list[str] | None = None) -> dict[str, Any]:
    paths = build_paths()
    schemas = dict(SCHEMAS)
    if agent_names:
        create = dict(schemas["SessionCreate"])
        create["properties"] = {**create["properties"], "agent": {"enum": sorted(agent_names)}}
        schemas["SessionCreate"] = create
    for extra in EXTRA_PATHS:
        paths.update(extra)
    return {
        "openapi": "3.1.0",
        "info": {"title": "steprun", "version": "1", "description": "The runtime layer for AI agents."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


@bp.get("/openapi.json")
def openapi_json():  # type: ignore[no-untyped-def]
    from api.context import runtime

    return jsonify(document([a.name for a in runtime().agents]))
