"""Runs (turns): create in the background, stream, wait, join, list, get, cancel; stateless runs.

A run with ``command: {"resume": ...}`` answers the thread's paused run: it
continues *that* run (same ``run_id``) instead of starting another, as a
steprun turn resumes after ``requires_action``.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Response, jsonify, request
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from api.auth import credential
from api.context import db, json_body, principal, runtime
from api.langgraph.common import (
    assistant_name,
    bind_agent,
    body_field,
    bp,
    create_thread,
    own_thread,
    query_paging,
)
from api.langgraph.convert import ON_BUSY, RUN_STATUS, run_json
from api.langgraph.frames import AFTER_ALL, JOIN_DEFAULT, STREAM_MODES, parse_position
from api.langgraph.stream import StreamRequest, run_stream, wait_body
from api.relay import rechecked, take_stream_slot
from shared.db import deadlocked
from shared.errors import BadInput, Conflict, NotFound
from shared.models import TERMINAL, AgentSession, Turn, TurnStatus
from shared.turns import service as turns

# A cancel that Postgres fails to break a deadlock is run again (a defence: the lock order that
# deadlocked, the published-event marker's events-then-session, is fixed in shared.turns.events.mark).
DEADLOCK_RETRIES = 3

# Run-creation fields steprun does not act on; a request that needs them is refused, not half-served.
UNSUPPORTED = ("interrupt_before", "interrupt_after", "checkpoint", "checkpoint_id", "webhook", "after_seconds")
ON_DISCONNECT = ("continue", "cancel")


@dataclass
class StartedRun:
    turn: Turn
    session: AgentSession
    assistant: str
    modes: frozenset[str]
    strategy: str
    cancel_on_disconnect: bool
    # Set when the request resumed a paused run: the log's head before it, where its new frames begin.
    resumed_after: int | None = None


def user_input(value: Any) -> str:
    """The text of the last user message of a LangGraph input (``{"messages": [...]}``)."""
    if not isinstance(value, dict):
        raise BadInput("'input' must be an object like {\"messages\": [{\"role\": \"user\", \"content\": ...}]}",
                       field="input")
    messages = value.get("messages")
    if isinstance(messages, (str, dict)):
        messages = [messages]
    if not isinstance(messages, list):
        raise BadInput("'input.messages' must be a list of messages", field="input.messages")
    for message in reversed(messages):
        role, content = None, None
        if isinstance(message, str):
            role, content = "user", message
        elif isinstance(message, (list, tuple)) and len(message) == 2:
            role, content = message
        elif isinstance(message, dict):
            role, content = message.get("role") or message.get("type"), message.get("content")
        if role not in ("user", "human"):
            continue
        text = _text(content)
        if text.strip():
            return text
    raise BadInput("'input.messages' holds no user message with text", field="input.messages")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks
        return "".join(str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def stream_modes(value: Any, default: tuple[str, ...] = ("values",)) -> frozenset[str]:
    if value is None or value == "" or value == []:
        return frozenset(default)
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BadInput("'stream_mode' must be a mode or a list of modes", field="stream_mode")
    flat = [part for name in names for part in name.split(",") if part]
    unknown = [n for n in flat if n not in STREAM_MODES]
    if unknown:
        raise BadInput(f"unknown stream_mode {unknown[0]!r}; known: {', '.join(STREAM_MODES)}", field="stream_mode")
    return frozenset(flat)


def _resume_body(resume: Any) -> dict[str, Any]:
    """``command.resume`` as the body of a native resume (shorthands: a boolean approves, a string answers)."""
    if isinstance(resume, bool):
        return {"approve": resume}
    if isinstance(resume, str):
        return {"input": resume}
    if isinstance(resume, dict):
        return resume
    raise BadInput("'command.resume' must be {\"approve\": bool}, {\"input\": str}, a boolean or a string",
                   field="command.resume")


def start_run(thread_id: str | None, *, default_modes: tuple[str, ...] = ("values",)) -> StartedRun:
    """Create (or resume) the run a request asks for, and commit it."""
    rt, who, body = runtime(), principal(), json_body()
    assistant = assistant_name(body.get("assistant_id"))
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}, ""):
            raise BadInput(f"'{name}' is not supported by steprun's LangGraph API (see the README)", field=name)
    strategy = body_field(body, "multitask_strategy", str, "enqueue")
    if strategy not in ON_BUSY:
        raise BadInput(f"'multitask_strategy' must be one of {', '.join(ON_BUSY)}", field="multitask_strategy")
    on_disconnect = body_field(body, "on_disconnect", str, "continue")
    if on_disconnect not in ON_DISCONNECT:
        raise BadInput("'on_disconnect' must be continue or cancel", field="on_disconnect")
    modes = stream_modes(body.get("stream_mode"), default_modes)
    command = body_field(body, "command", dict)
    if command is not None and body.get("input") is not None:
        raise BadInput("send either 'input' or 'command', not both", field="command")
    if command is not None and set(command) - {"resume"}:
        raise BadInput("only 'command.resume' is supported (goto and update are not)", field="command")
    if command is None and body.get("input") is None:
        raise BadInput("'input' is required (or 'command' with 'resume')", field="input")

    if thread_id is None:
        session = create_thread(None, body.get("metadata"), assistant)
    else:
        if_not_exists = body_field(body, "if_not_exists", str, "reject")
        if if_not_exists not in ("reject", "create"):
            raise BadInput("'if_not_exists' must be reject or create", field="if_not_exists")
        try:
            session = own_thread(thread_id, lock=True)
        except NotFound:
            if if_not_exists != "create":
                raise
            session = create_thread(thread_id, None, assistant)
    bind_agent(session, assistant)
    resumed_after = None
    if command is not None:
        paused = db().get(Turn, session.active_turn_id) if session.active_turn_id else None
        if paused is None or paused.status != TurnStatus.REQUIRES_ACTION:
            raise Conflict(f"thread {session.id} has no interrupted run to resume")
        resumed_after = rt.events.head(session.id)  # read before the commit: the resumed run's frames follow it
        turn = turns.resume_turn(db(), rt, who, paused.id, _resume_body(command["resume"]))
    else:
        text = user_input(body["input"])
        if strategy == "rollback":
            # The active run and those waiting behind it are deleted, as if they never ran; the
            # thread is then idle, so the new run starts at once. One transaction: all or nothing.
            turns.rollback_session(db(), rt, who, session.id, "rolled back by a new run (multitask_strategy)")
        turn, _ = turns.create_turn(db(), rt, who, session.id, text, ON_BUSY[strategy])
    started = StartedRun(turn, session, assistant, modes, strategy, on_disconnect == "cancel", resumed_after)
    db().commit()
    return started


def _locations(run: StartedRun, kind: str) -> dict[str, str]:
    thread, turn = run.session.id, run.turn.id
    # Location is relative to the client's base URL (…/langgraph), as langgraph-sdk resolves it.
    location = f"/threads/{thread}/runs/{turn}/{kind}"
    if kind == "stream":
        location += "?stream_mode=" + ",".join(sorted(run.modes))
    return {"Content-Location": f"/langgraph/threads/{thread}/runs/{turn}", "Location": location}


def _stream_response(run: StartedRun) -> Response:
    req = StreamRequest(runtime(), principal(), run.session.id, run.turn.id, run.assistant, run.modes,
                        cancel_on_disconnect=run.cancel_on_disconnect)
    if run.resumed_after is not None:
        req.skip = req.opening = (run.resumed_after, AFTER_ALL)
    return _sse_response(req, _locations(run, "stream"))


def _sse_response(req: StreamRequest, headers: dict[str, str]) -> Response:
    sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
    body = rechecked(req.rt, credential(), run_stream(req, sock), _unauthorized)
    return Response(body, mimetype="text/event-stream", headers={
        "Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})


def _unauthorized(problem: tuple[str, str], last: str | None) -> str:  # noqa: ARG001
    """The error event that ends a run stream whose credential expired or whose key was revoked."""
    data = json.dumps({"error": "unauthorized", "reason": problem[0], "message": problem[1]}, separators=(",", ":"))
    return f"event: error\ndata: {data}\n\n"


def _holding_slot(respond: Callable[[], Response]) -> Response:
    """``respond()`` (a stream or a waiting body) holding one of the caller's stream slots until it is closed.

    The slot is taken first: a caller holding all of theirs gets 429 too_many_streams and no run is created.
    """
    slot = take_stream_slot(runtime(), principal())
    try:
        response = respond()
    except BaseException:
        slot.release()
        raise
    response.call_on_close(slot.release)
    return response


def _wait_response(run: StartedRun) -> Response:
    body = wait_body(runtime(), principal(), run.session.id, run.turn.id)
    return Response(body, mimetype="application/json", headers=_locations(run, "join"))


@bp.post("/threads/<lg_id:thread_id>/runs")
def create_run(thread_id: str) -> Response:
    run = start_run(thread_id)
    response = jsonify(run_json(run.turn, run.assistant, run.strategy))
    response.headers["Content-Location"] = _locations(run, "join")["Content-Location"]
    return response


@bp.post("/runs")
def create_stateless_run() -> Response:
    run = start_run(None)
    response = jsonify(run_json(run.turn, run.assistant, run.strategy))
    response.headers["Content-Location"] = _locations(run, "join")["Content-Location"]
    return response


@bp.post("/threads/<lg_id:thread_id>/runs/stream")
def stream_run(thread_id: str) -> Response:
    return _holding_slot(lambda: _stream_response(start_run(thread_id)))


@bp.post("/runs/stream")
def stream_stateless_run() -> Response:
    return _holding_slot(lambda: _stream_response(start_run(None)))


@bp.post("/threads/<lg_id:thread_id>/runs/wait")
def wait_run(thread_id: str) -> Response:
    return _holding_slot(lambda: _wait_response(start_run(thread_id)))


@bp.post("/runs/wait")
def wait_stateless_run() -> Response:
    return _holding_slot(lambda: _wait_response(start_run(None)))


def _own_run(thread_id: str, run_id: str) -> tuple[AgentSession, Turn]:
    session = own_thread(thread_id)
    turn = db().get(Turn, run_id)
    if turn is None or turn.session_id != session.id:
        raise NotFound(f"no run {run_id!r} in thread {thread_id!r}")
    return session, turn


@bp.get("/threads/<lg_id:thread_id>/runs")
def list_runs(thread_id: str) -> Response:
    session = own_thread(thread_id)
    limit, offset = query_paging()
    status = request.args.get("status") or None
    query = select(Turn).where(Turn.session_id == session.id, Turn.tenant_id == session.tenant_id,
                               Turn.user_id == session.user_id)
    if status is not None:
        wanted = [s for s, name in RUN_STATUS.items() if name == status]
        if not wanted:
            raise BadInput(f"unknown run status {status!r}", field="status")
        query = query.where(Turn.status.in_(wanted))
    rows = db().scalars(query.order_by(Turn.seq.desc()).offset(offset).limit(limit))
    return jsonify([run_json(t, session.agent) for t in rows])


@bp.get("/threads/<lg_id:thread_id>/runs/<run_id:run_id>")
def get_run(thread_id: str, run_id: str) -> Response:
    session, turn = _own_run(thread_id, run_id)
    return jsonify(run_json(turn, session.agent))


@bp.get("/threads/<lg_id:thread_id>/runs/<run_id:run_id>/join")
def join_run(thread_id: str, run_id: str) -> Response:
    session, turn = _own_run(thread_id, run_id)
    db().close()  # the body waits: hold no connection
    return _holding_slot(lambda: Response(wait_body(runtime(), principal(), session.id, turn.id),
                                          mimetype="application/json"))


@bp.get("/threads/<lg_id:thread_id>/runs/<run_id:run_id>/stream")
def join_run_stream(thread_id: str, run_id: str) -> Response:
    session, turn = _own_run(thread_id, run_id)
    raw_id = request.headers.get("Last-Event-ID", "").strip()
    skip = parse_position(raw_id)
    if raw_id and skip is None:
        raise BadInput("Last-Event-ID must be an id this stream sent (like 1700000000000001-2)",
                       field="Last-Event-ID")
    raw_modes = request.args.getlist("stream_mode")
    modes = stream_modes(raw_modes if any(raw_modes) else None, JOIN_DEFAULT)
    cancel = request.args.get("cancel_on_disconnect", "false").lower() in ("1", "true", "yes")
    req = StreamRequest(runtime(), principal(), session.id, turn.id, session.agent, modes,
                        skip=skip, cancel_on_disconnect=cancel)
    db().close()
    return _holding_slot(lambda: _sse_response(req, {}))


@bp.post("/threads/<lg_id:thread_id>/runs/<run_id:run_id>/cancel")
def cancel_run(thread_id: str, run_id: str) -> tuple[Response, int]:
    rt = runtime()
    action = request.args.get("action", "interrupt")
    if action not in ("interrupt", "rollback"):
        raise BadInput("'action' must be interrupt or rollback", field="action")
    session, turn = _own_run(thread_id, run_id)
    for attempt in range(DEADLOCK_RETRIES + 1):
        try:
            if action == "rollback" and turns.rollback_turn(db(), rt, principal(), turn.id, "rolled back (cancel)"):
                db().commit()
                return Response(status=204), 204  # the run is gone, as if it never ran
            turns.cancel_turn(db(), rt, principal(), turn.id)
            db().commit()
            break
        except OperationalError as exc:
            # Postgres failed this transaction whole to break a deadlock: it is safe to run again.
            if not deadlocked(exc) or attempt == DEADLOCK_RETRIES:
                raise
            db().rollback()
    if request.args.get("wait", "0").lower() in ("1", "true"):
        deadline = time.monotonic() + rt.settings.max_wait_seconds
        while time.monotonic() < deadline:
            cursor = rt.events.head(session.id)
            db().close()
            if turns.get_turn(db(), principal(), turn.id).status in TERMINAL:
                break
            db().close()
            rt.events.wait(session.id, cursor, min(1.0, max(0.0, deadline - time.monotonic())), limit=1)
    return jsonify(run_json(turns.get_turn(db(), principal(), turn.id), session.agent)), 202
