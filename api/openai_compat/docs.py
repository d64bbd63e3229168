"""The OpenAPI description of the OpenAI-compatible routes."""
from __future__ import annotations

from typing import Any

from api.openapi import RouteDocs, json_response, path_param, query, ref

RID, CID = path_param("response_id"), path_param("conversation_id")
LIST_PARAMS = [query("limit", {"type": "integer", "minimum": 1, "maximum": 100}),
               query("after", {"type": "string"}, "an item id: the page after it"),
               query("order", {"enum": ["asc", "desc"]})]
ERR = {"400": "bad input: param names the field or item", "401": "no key, or a bad one",
       "404": "not found, or not yours (model_not_found for an unknown model)", "409": "conflict",
       "413": "too large", "429": "over a limit (Retry-After)", "503": "a dependency is down (Retry-After)"}


def _op(summary: str, schema: dict[str, Any], *, body: str | None = None, params: list[dict[str, Any]] | None = None,
        errors: tuple[str, ...] = ("400", "401", "404", "429"), sse: bool = False,
        body_required: bool = True) -> dict[str, Any]:
    ok: dict[str, Any] = json_response(schema)
    if sse:
        ok["content"]["text/event-stream"] = {"schema": {
            "type": "object", "description": "one server-sent event (its event name, data and id)",
            "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}}}}
    out: dict[str, Any] = {"summary": summary, "parameters": params or [], "responses": {
        "200": ok, **{code: json_response(ref("OpenAIError"), ERR[code]) for code in errors}}}
    if body:
        out["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": ref(body)}}}
    return out


def describe() -> RouteDocs:
    obj = {"type": "object"}
    return RouteDocs({
        "/v1/responses": {"post": _op(
            "Create a response (OpenAI Responses API): model names the agent; stream=true answers with SSE, "
            "background=true at once, otherwise when it ends", ref("OpenAIResponse"), body="OpenAIResponseCreate",
            errors=("400", "401", "404", "409", "413", "429"), sse=True)},
        "/v1/responses/{response_id}": {
            "get": _op("A response; ?stream=true replays its events from sequence 0 (after starting_after) "
                       "and follows the live ones", ref("OpenAIResponse"), sse=True, params=[
                           RID, query("stream", {"enum": ["true", "false"]}),
                           query("starting_after", {"type": "integer", "minimum": 0})]),
            "delete": _op("Delete a finished response", obj, params=[RID], errors=("400", "401", "404", "409", "429")),
        },
        "/v1/responses/{response_id}/cancel": {"post": _op(
            "Cancel (idempotent): status cancelled, partial output kept", ref("OpenAIResponse"), params=[RID])},
        "/v1/responses/{response_id}/input_items": {"get": _op(
            "What was sent to start the response", ref("OpenAIList"), params=[RID, *LIST_PARAMS])},
        "/v1/conversations": {"post": _op("Create a conversation (a session; the first response binds its agent)",
                                          ref("OpenAIConversation"), body="OpenAIConversationCreate",
                                          errors=("400", "401", "413", "429"), body_required=False)},
        "/v1/conversations/{conversation_id}": {
            "get": _op("A conversation", ref("OpenAIConversation"), params=[CID]),
            "post": _op("Update its metadata", ref("OpenAIConversation"), params=[CID],
                        body="OpenAIConversationUpdate", errors=("400", "401", "404", "413", "429")),
            "delete": _op("Delete it with its history", obj, params=[CID]),
        },
        "/v1/conversations/{conversation_id}/items": {"get": _op(
            "Its items: messages, mcp_call, approvals (default order desc)", ref("OpenAIList"),
            params=[CID, *LIST_PARAMS])},
    }, schemas={
        "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
        "OpenAIResponse": {"type": "object", "required": ["id", "object", "status", "output", "model"],
                           "properties": {
                               "id": {"type": "string"}, "object": {"const": "response"},
                               "status": {"enum": ["queued", "in_progress", "completed", "failed", "cancelled",
                                                   "incomplete"]},
                               "model": {"type": "string"}, "output": {"type": "array", "items": obj},
                               "usage": obj, "error": {"type": ["object", "null"]},
                               "incomplete_details": {"type": ["object", "null"]},
                               "conversation": {"type": ["object", "null"]},
                               "previous_response_id": {"type": ["string", "null"]}}},
        "OpenAIResponseCreate": {"type": "object", "required": ["model", "input"], "properties": {
            "model": {"type": "string"}, "input": {"type": ["string", "array"]},
            "stream": {"type": "boolean"}, "background": {"type": "boolean"},
            "previous_response_id": {"type": "string"}, "conversation": {"type": ["string", "object"]}}},
        "OpenAIConversation": {"type": "object", "required": ["id", "object", "created_at", "metadata"],
                               "properties": {"id": {"type": "string"}, "object": {"const": "conversation"},
                                              "created_at": {"type": "integer"}, "metadata": obj}},
        "OpenAIConversationCreate": {"type": "object", "properties": {
            "metadata": {"type": ["object", "null"]}, "items": {"type": ["array", "null"], "items": obj}}},
        "OpenAIConversationUpdate": {"type": "object", "required": ["metadata"], "properties": {"metadata": obj}},
        "OpenAIList": {"type": "object", "required": ["object", "data", "has_more"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": obj},
            "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"}}},
    })
