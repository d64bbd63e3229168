"""Assistants (the agents served) and threads (sessions): create, read, update, delete, search, state."""
from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from sqlalchemy import select

from api.context import db, json_body, principal, runtime
from api.langgraph import state
from api.langgraph.common import (
    assistant_name,
    body_field,
    bp,
    check_metadata,
    create_thread,
    own_thread,
    paging,
)
from api.langgraph.convert import assistant_json
from shared.errors import BadInput
from shared.models import AgentSession
from shared.turns import service as turns

THREAD_STATUSES = ("idle", "busy", "interrupted", "error")
# How many of the caller's newest threads a filtered search looks through.
SEARCH_SCAN = 5000


@bp.get("/info")
def info() -> Response:
    return jsonify({"version": "steprun", "langgraph_py_version": None,
                    "flags": {"assistants": True, "crons": False, "store": False, "langsmith": False}})


@bp.post("/assistants/search")
def search_assistants() -> Response:
    body = json_body()
    limit, offset = paging(body)
    graph_id, name = body_field(body, "graph_id", str), body_field(body, "name", str)
    check_metadata(body.get("metadata"))  # every assistant's metadata is {}: any filter but {} matches none
    if body.get("metadata"):
        return jsonify([])
    agents = [a for a in runtime().agents if (graph_id is None or a.name == graph_id)
              and (name is None or name.lower() in a.name.lower())]
    return jsonify([assistant_json(a.name, a.description) for a in agents[offset:offset + limit]])


@bp.get("/assistants/<lg_id:assistant_id>")
def get_assistant(assistant_id: str) -> Response:
    agent = runtime().agents.get(assistant_name(assistant_id))
    return jsonify(assistant_json(assistant_id, agent.description if agent else ""))


@bp.post("/threads")
def create_thread_route() -> Response:
    body = json_body()
    if_exists = body_field(body, "if_exists", str, "raise")
    if if_exists not in ("raise", "do_nothing"):
        raise BadInput("'if_exists' must be raise or do_nothing", field="if_exists")
    graph_id = body_field(body, "graph_id", str)
    row = create_thread(body.get("thread_id"), body.get("metadata"),
                        assistant_name(graph_id) if graph_id else "", if_exists)
    db().commit()
    return jsonify(state.thread_json(db(), principal(), row))


@bp.get("/threads/<lg_id:thread_id>")
def get_thread(thread_id: str) -> Response:
    return jsonify(state.thread_json(db(), principal(), own_thread(thread_id)))


@bp.patch("/threads/<lg_id:thread_id>")
def patch_thread(thread_id: str) -> Response:
    body = json_body()
    row = own_thread(thread_id, lock=True)
    if "metadata" in body:
        # LangGraph merges the new metadata into the old.
        row.metadata_ = check_metadata({**(row.metadata_ or {}), **check_metadata(body["metadata"])})
    db().commit()
    return jsonify(state.thread_json(db(), principal(), row))


@bp.delete("/threads/<lg_id:thread_id>")
def delete_thread(thread_id: str) -> tuple[str, int]:
    own_thread(thread_id)
    turns.delete_session(db(), runtime(), principal(), thread_id)
    db().commit()
    return "", 204


@bp.post("/threads/search")
def search_threads() -> Response:
    body = json_body()
    limit, offset = paging(body)
    metadata = check_metadata(body.get("metadata"))
    status = body_field(body, "status", str)
    if status is not None and status not in THREAD_STATUSES:
        raise BadInput(f"'status' must be one of {', '.join(THREAD_STATUSES)}", field="status")
    ids = body_field(body, "ids", list)
    order = body_field(body, "sort_order", str, "desc")
    sort_by = body_field(body, "sort_by", str, "updated_at")
    if order not in ("asc", "desc") or sort_by not in ("created_at", "updated_at", "thread_id"):
        raise BadInput("'sort_by' must be created_at, updated_at or thread_id; 'sort_order' asc or desc",
                       field="sort_by")
    who = principal()
    column = {"created_at": AgentSession.created_at, "updated_at": AgentSession.updated_at,
              "thread_id": AgentSession.id}[sort_by]
    query = select(AgentSession).where(AgentSession.tenant_id == who.tenant_id, AgentSession.user_id == who.user_id)
    if ids is not None:
        query = query.where(AgentSession.id.in_([str(i) for i in ids[:MAX_IDS]]))
    query = query.order_by(column.asc() if order == "asc" else column.desc(), AgentSession.id)
    out: list[dict[str, Any]] = []
    skipped = 0
    for row in db().scalars(query.limit(SEARCH_SCAN)):
        view = state.thread_json(db(), who, row, with_values=False)
        if any(view["metadata"].get(k) != v for k, v in metadata.items()):
            continue
        if status is not None and view["status"] != status:
            continue
        if skipped < offset:
            skipped += 1
            continue
        out.append(view)
        if len(out) >= limit:
            break
    return jsonify(out)


MAX_IDS = 1000


@bp.get("/threads/<lg_id:thread_id>/state")
def get_state(thread_id: str) -> Response:
    return jsonify(state.state_json(db(), principal(), own_thread(thread_id)))


@bp.get("/threads/<lg_id:thread_id>/state/<checkpoint:checkpoint_id>")
def get_state_at(thread_id: str, checkpoint_id: str) -> Response:
    return jsonify(state.state_at_json(db(), principal(), own_thread(thread_id), checkpoint_id))


@bp.post("/threads/<lg_id:thread_id>/state/checkpoint")
def get_state_at_checkpoint(thread_id: str) -> Response:
    """RemoteGraph's get_state: a checkpoint config, whose checkpoint_id (if any) picks the state."""
    session = own_thread(thread_id)
    checkpoint = json_body().get("checkpoint")
    checkpoint = {} if checkpoint is None else checkpoint
    if not isinstance(checkpoint, dict):
        raise BadInput("'checkpoint' must be an object", field="checkpoint")
    checkpoint_id = checkpoint.get("checkpoint_id")
    if checkpoint_id is None:
        return jsonify(state.state_json(db(), principal(), session))
    return jsonify(state.state_at_json(db(), principal(), session, str(checkpoint_id)))


@bp.post("/threads/<lg_id:thread_id>/state")
def update_state(thread_id: str) -> Response:
    own_thread(thread_id)
    raise BadInput("updating a thread's state is not supported: start a run with the new input instead")


@bp.post("/threads/<lg_id:thread_id>/history")
def get_history(thread_id: str) -> Response:
    body = json_body()
    limit = body_field(body, "limit", int, 10)
    if not 1 <= limit <= 100:
        raise BadInput("'limit' must be between 1 and 100", field="limit")
    before = body.get("before")
    if isinstance(before, dict):  # a config: {"configurable": {"checkpoint_id": ...}}
        before = (before.get("configurable") or {}).get("checkpoint_id")
    if before is not None and not isinstance(before, str):
        raise BadInput("'before' must be a checkpoint id or config", field="before")
    return jsonify(state.history_json(db(), principal(), own_thread(thread_id), limit, before))
