"""LangGraph Agent Server's threads/runs API at /langgraph (DESIGN 10.2), over steprun's sessions and turns.

``langgraph_sdk.get_client(url="http://HOST/langgraph", api_key=<steprun key>)``
and ``RemoteGraph(name, url=...)`` work against it unchanged. A thin
translation: runs are turns created and resumed by :mod:`shared.turns.service`,
streams read the same event log as the native SSE route.
"""
from __future__ import annotations

import json
from typing import Any

from flask import Flask, Response, request
from werkzeug.routing import BaseConverter

from api.langgraph import runs, threads
from api.langgraph.common import bp
from api.openapi import OBJ, RouteDocs, header, op, path_param, query
from shared.settings import SettingsError

__all__ = ["install", "describe", "runs", "threads"]
PREFIX = "/langgraph"
CHUNK_MODES = ("live", "committed")


def install(app: Flask) -> None:
    """Register the blueprint, and LangGraph's error shape (``{"detail": ...}``) on its paths."""
    chunks = app.extensions["steprun"].settings.langgraph_chunks
    if chunks not in CHUNK_MODES:
        raise SettingsError(f"STEPRUN_LANGGRAPH_CHUNKS={chunks!r}: expected live or committed")
    # A run id is a turn id: so .../runs/stream and .../runs/wait never also read as "the run named stream".
    app.url_map.converters.update(run_id=RunIdConverter, lg_id=NameConverter, checkpoint=CheckpointConverter)
    app.register_blueprint(bp)

    @app.after_request
    def _detail_errors(response: Response) -> Response:
        # Every error (auth, routing, limits, the routes' own) is made by the app-wide handlers as
        # {"error": {...}}; on these paths the clients read {"detail": "..."}.
        if response.status_code < 400 or not _under_prefix(request.path) or not response.is_json:
            return response
        body = response.get_json(silent=True)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            response.set_data(json.dumps({"detail": body["error"].get("message", "")}))
        return response


class RunIdConverter(BaseConverter):
    regex = r"turn_[0-9a-f]{1,64}"


class NameConverter(BaseConverter):
    """A thread or assistant id: never "search", so POST …/search is not also GET of the one named so."""

    regex = r"(?!search(?![A-Za-z0-9_-]))[A-Za-z0-9_-]{1,64}"


class CheckpointConverter(BaseConverter):
    regex = r"[0-9]{1,18}"


def _under_prefix(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def describe() -> RouteDocs:
    """The /langgraph routes; their errors are documented as ``{"detail": ...}``."""
    docs = _describe()
    for name in ("ThreadCreate", "ThreadPatch", "LGSearch", "LGAssistantSearch", "LGHistory", "LGCheckpoint"):
        for prop in docs.schemas[name]["properties"].values():
            # Clients send null for "not given" (the SDK drops it, others do not): null is a default.
            if isinstance(prop.get("type"), str):
                prop["type"] = [prop["type"], "null"]
            if "enum" in prop and None not in prop["enum"]:
                prop["enum"] = [*prop["enum"], None]
    for operations in docs.paths.values():
        for operation in operations.values():
            for code, response in operation["responses"].items():
                if code[0] in "45":
                    response["content"]["application/json"]["schema"] = {"$ref": "#/components/schemas/Detail"}
            body = operation.get("requestBody")
            if body and body["content"]["application/json"]["schema"] != {"$ref": "#/components/schemas/RunCreate"}:
                body["required"] = False  # the SDK may send no body: every field has a default
            if "204" in operation["responses"]:
                operation["responses"]["204"] = {"description": "deleted"}
    return docs


def _describe() -> RouteDocs:
    tid, rid, aid = path_param("thread_id"), path_param("run_id"), path_param("assistant_id")
    errs = ("400", "401", "404", "429")
    sse = {"type": "object", "description": "one server-sent event (its event name, data and id)",
           "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}}}
    run_errors = ("400", "401", "404", "409", "413", "429")
    # Empty means none, as an EventSource may send it: the stream starts from the run's beginning.
    last_id = header("Last-Event-ID", "the id of the last frame received: the stream resumes after it (empty: none)",
                     min_length=0)
    create = "RunCreate"

    def stream_op(summary: str, params: list[dict[str, Any]]) -> dict[str, Any]:
        return op(summary, "200", sse, body=create, params=params, errors=run_errors,
                  content_type="text/event-stream")

    return RouteDocs({
        f"{PREFIX}/info": {"get": op("Server information and flags", "200", OBJ, errors=("401",))},
        f"{PREFIX}/assistants/search": {"post": op("The agents served, as assistants", "200",
                                                   {"type": "array", "items": OBJ}, body="LGAssistantSearch",
                                                   errors=errs)},
        f"{PREFIX}/assistants/{{assistant_id}}": {"get": op("One assistant (an agent)", "200", OBJ, params=[aid])},
        f"{PREFIX}/threads": {"post": op("Create a thread (a session its first run binds to an agent)", "200",
                                         ref_thread(), body="ThreadCreate", errors=("400", "401", "404", "409",
                                                                                    "413", "429"))},
        f"{PREFIX}/threads/search": {"post": op("Your threads, filtered by metadata, status or ids", "200",
                                                {"type": "array", "items": ref_thread()}, body="LGSearch",
                                                errors=errs)},
        f"{PREFIX}/threads/{{thread_id}}": {
            "get": op("One thread", "200", ref_thread(), params=[tid]),
            "patch": op("Merge metadata into a thread", "200", ref_thread(), body="ThreadPatch", params=[tid]),
            "delete": op("Delete a thread with its history", "204", OBJ, params=[tid]),
        },
        f"{PREFIX}/threads/{{thread_id}}/state": {
            "get": op("The thread's state: messages as LangChain message dicts, and any interrupt", "200", OBJ,
                      params=[tid]),
            "post": op("Not supported (400): start a run instead", "200", OBJ, params=[tid])},
        f"{PREFIX}/threads/{{thread_id}}/state/{{checkpoint_id}}": {
            "get": op("The state at one kept checkpoint", "200", OBJ, params=[tid, path_param("checkpoint_id")])},
        f"{PREFIX}/threads/{{thread_id}}/state/checkpoint": {
            "post": op("The state at a checkpoint config (the latest without checkpoint_id)", "200", OBJ,
                       body="LGCheckpoint", params=[tid])},
        f"{PREFIX}/threads/{{thread_id}}/history": {
            "post": op("One state per kept checkpoint, newest first", "200", {"type": "array", "items": OBJ},
                       body="LGHistory", params=[tid])},
        f"{PREFIX}/threads/{{thread_id}}/runs": {
            "post": op("Start a run in the background (or resume the interrupted one with command)", "200", OBJ,
                       body=create, params=[tid], errors=run_errors),
            "get": op("The thread's runs, newest first", "200", {"type": "array", "items": OBJ},
                      params=[tid, query("limit", {"type": "integer", "minimum": 1, "maximum": 100}),
                              query("offset", {"type": "integer", "minimum": 0}),
                              query("status", {"enum": ["pending", "running", "success", "error", "timeout",
                                                        "interrupted"]})])},
        f"{PREFIX}/threads/{{thread_id}}/runs/stream": {"post": stream_op(
            "Start a run and stream it as SSE (values, updates, messages-tuple, messages); every frame has an "
            "id, and Location is where to reconnect with Last-Event-ID", [tid])},
        f"{PREFIX}/threads/{{thread_id}}/runs/wait": {"post": op(
            "Start a run and answer its final state (whitespace heartbeats first)", "200", OBJ, body=create,
            params=[tid], errors=run_errors)},
        f"{PREFIX}/runs": {"post": op("Start a run on a new thread, in the background", "200", OBJ, body=create,
                                      errors=run_errors)},
        f"{PREFIX}/runs/stream": {"post": stream_op("Start a run on a new thread and stream it", [])},
        f"{PREFIX}/runs/wait": {"post": op("Start a run on a new thread and answer its final state", "200", OBJ,
                                           body=create, errors=run_errors)},
        f"{PREFIX}/threads/{{thread_id}}/runs/{{run_id}}": {"get": op("One run", "200", OBJ, params=[tid, rid])},
        f"{PREFIX}/threads/{{thread_id}}/runs/{{run_id}}/join": {"get": op(
            "Wait for the run to end or pause; its final state", "200", OBJ, params=[tid, rid])},
        f"{PREFIX}/threads/{{thread_id}}/runs/{{run_id}}/stream": {"get": op(
            "Join a run's stream: every frame after Last-Event-ID (from its start without one), then live",
            "200", sse, content_type="text/event-stream",
            params=[tid, rid, last_id, query("stream_mode", {"type": "string"}, "modes, repeated or comma-separated"),
                    query("cancel_on_disconnect", {"type": "boolean"})])},
        f"{PREFIX}/threads/{{thread_id}}/runs/{{run_id}}/cancel": {"post": op(
            "Cancel a run (idempotent); wait=1 waits for it to stop; action=rollback deletes it (204)", "202", OBJ,
            also={"204": "rolled back: the run and what it wrote are deleted"},
            params=[tid, rid, query("wait", {"type": "boolean"}),
                    query("action", {"enum": ["interrupt", "rollback"]})])},
    }, schemas={
        "RunCreate": {"type": "object", "required": ["assistant_id"], "properties": {
            "assistant_id": {"type": "string"}, "input": {"type": ["object", "null"]},
            "command": {"type": ["object", "null"], "properties": {"resume": {}}},
            "stream_mode": {}, "multitask_strategy": {"enum": ["reject", "enqueue", "interrupt", "rollback"]},
            "if_not_exists": {"enum": ["reject", "create"]}, "on_disconnect": {"enum": ["continue", "cancel"]},
            "metadata": {"type": ["object", "null"]}, "config": {}, "context": {}}},
        "ThreadCreate": {"type": "object", "properties": {
            "thread_id": {"type": "string", "maxLength": 40}, "metadata": {"type": ["object", "null"]},
            "if_exists": {"enum": ["raise", "do_nothing"]}, "graph_id": {"type": "string"}}},
        "LGCheckpoint": {"type": "object", "properties": {"checkpoint": {"type": "object"},
                                                          "subgraphs": {}}},
        "Detail": {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}},
        "ThreadPatch": {"type": "object", "properties": {"metadata": {"type": "object"}}},
        "LGSearch": {"type": "object", "properties": {
            "limit": {"type": "integer", "minimum": 1, "maximum": 100}, "offset": {"type": "integer", "minimum": 0},
            "metadata": {"type": "object"}, "status": {"type": "string"},
            "sort_by": {"enum": ["created_at", "updated_at", "thread_id"]}, "sort_order": {"enum": ["asc", "desc"]},
            "ids": {"type": "array", "items": {"type": "string"}}}},
        "LGAssistantSearch": {"type": "object", "properties": {
            "limit": {"type": "integer", "minimum": 1, "maximum": 100}, "offset": {"type": "integer", "minimum": 0},
            "metadata": {"type": "object"}, "graph_id": {"type": "string"}, "name": {"type": "string"}}},
        "LGHistory": {"type": "object", "properties": {"limit": {"type": "integer", "minimum": 1, "maximum": 100},
                                                       "before": {}}},
        "Thread": {"type": "object", "required": ["thread_id", "status"], "properties": {
            "thread_id": {"type": "string"}, "status": {"enum": ["idle", "busy", "interrupted", "error"]},
            "metadata": {"type": "object"}, "values": {}, "interrupts": {"type": "object"},
            "created_at": {"type": "string"}, "updated_at": {"type": "string"}}},
    })


def ref_thread() -> dict[str, Any]:
    return {"$ref": "#/components/schemas/Thread"}
