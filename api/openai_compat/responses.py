"""OpenAI's Responses API over steprun's turns (DESIGN 10.1): create, retrieve, stream, cancel, delete."""
from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy.orm import Session

from api.auth import credential
from api.context import db, int_arg, json_body, principal, runtime
from api.openai_compat import errors, ids, stream
from api.openai_compat.ids import ResponseRef
from api.openai_compat.inputs import Input, parse_input
from api.openai_compat.listing import list_json
from api.openai_compat.objects import input_items
from api.openai_compat.store import conversation, load
from api.relay import rechecked, take_stream_slot
from shared.auth.principal import Principal
from shared.db import unit_of_work
from shared.errors import BadInput, Conflict, NotFound
from shared.models import TERMINAL, AgentSession, TurnStatus
from shared.runtime import Runtime
from shared.streaming.protocol import MAX_CURSOR
from shared.turns import conversations
from shared.turns import service as turns

bp = Blueprint("openai_responses", __name__, url_prefix="/v1/responses")
errors.install(bp)

# A create without background or stream answers when the response ends, or after this long with
# its status then (the official client's own timeout is 600 s).
SYNC_WAIT_SECONDS = 590.0
# A cancel answers once the running step has stopped, or after this long.
CANCEL_WAIT_SECONDS = 10.0


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadInput(f"'{name}' must be true or false", field=name)
    return value


@bp.post("")
def create_response() -> Response:
    body = json_body()
    rt, who = runtime(), principal()
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadInput("'model' is required: the name of a steprun agent", field="model")
    if rt.agents.get(model) is None:
        known = ", ".join(a.name for a in rt.agents)
        raise errors.ModelNotFound(f"The model '{model}' does not exist; this deployment serves: {known}",
                                   field="model")
    streaming, background = _flag(body, "stream"), _flag(body, "background")
    parsed = parse_input(body.get("input"))
    # A stream, or a create that waits for its answer, holds a connection: one of the caller's stream slots,
    # taken before anything is written (429 too_many_streams, and no response is created).
    slot = take_stream_slot(rt, who) if streaming or not background else None
    try:
        session = _session_for(db(), rt, who, body, model, parsed)
        head = rt.events.head(session.id)  # every event of the new response comes after this cursor
        ref = _start(db(), rt, who, session, parsed)
        session_id = session.id
        db().commit()
        if streaming:
            response = _sse(rechecked(rt, credential(), stream.response_events(rt, who, ref, session_id, after=head),
                                           stream.unauthorized_frame))
            response.call_on_close(slot.release)  # type: ignore[union-attr]
            slot = None  # the response gives it back when it ends
            return response
        if background:
            return jsonify(_background(load(db(), rt, who, ref).json()))
        db().close()
        return jsonify(wait_for_end(rt, who, ref, session_id, SYNC_WAIT_SECONDS))
    finally:
        if slot is not None:
            slot.release()


def _background(body: dict[str, Any]) -> dict[str, Any]:
    body["background"] = True
    return body


def _session_for(db: Session, rt: Runtime, who: Principal, body: dict[str, Any], model: str,
                 parsed: Input) -> AgentSession:
    previous, conv = body.get("previous_response_id"), body.get("conversation")
    if previous is not None and conv is not None:
        raise BadInput("send 'previous_response_id' or 'conversation', not both", field="previous_response_id")
    if isinstance(conv, dict):
        conv = conv.get("id")
    if previous is not None:
        if not isinstance(previous, str):
            raise BadInput("'previous_response_id' must be a string", field="previous_response_id")
        try:
            session = load(db, rt, who, ids.parse_response_id(previous)).session
        except NotFound as exc:
            raise NotFound(exc.message, field="previous_response_id") from None
    elif conv is not None:
        if not isinstance(conv, str):
            raise BadInput("'conversation' must be a conversation id or {\"id\": ...}", field="conversation")
        session = conversation(db, who, conv, field="conversation")
    else:
        session = turns.create_session(db, rt, who, model, None)
        conversations.seed_history(db, rt, who, session, parsed.history)
        return session
    if parsed.history:
        raise BadInput("with previous_response_id or conversation, send only the new user message: the history "
                       "is kept on the server", field="input")
    conversations.bind_agent(rt, session, model)
    return session


def _start(db: Session, rt: Runtime, who: Principal, session: AgentSession, parsed: Input) -> ResponseRef:
    """Start the turn, or resume the paused one this input answers; the response that shows it."""
    active = turns.get_turn(db, who, session.active_turn_id) if session.active_turn_id else None
    paused = active if active is not None and active.status == TurnStatus.REQUIRES_ACTION else None
    pending = (paused.pending or {}) if paused is not None else {}
    if parsed.approvals:
        if paused is None or pending.get("reason") != "approval":
            raise BadInput("nothing in this conversation waits for an approval", field=parsed.approvals[0][2])
        calls = pending.get("tool_calls") or []
        answers = set()
        for request_id, approve, where in parsed.approvals:
            target = ids.parse_approval_id(request_id)
            if (target is None or target[0] != paused.id or target[1] != paused.step_count - 1
                    or target[2] >= len(calls) or calls[target[2]]["id"] not in pending.get("needs_approval", [])):
                raise BadInput(f"{where}: {request_id!r} is not an approval request this conversation waits for",
                               field=f"{where}.approval_request_id")
            answers.add(approve)
        if len(answers) > 1:
            raise BadInput("approve or decline all of the pending requests alike", field="input")
        turns.resume_turn(db, rt, who, paused.id, {"approve": answers.pop()})
        return ResponseRef(paused.id, paused.step_count)
    if paused is not None and (pending.get("reason") == "question" or pending.get("questions")) \
            and not pending.get("needs_approval"):
        turns.resume_turn(db, rt, who, paused.id, {"input": parsed.text})  # the answer to ask_user
        return ResponseRef(paused.id, paused.step_count)
    # A new input while an approval waits moves on without it, as OpenAI drops an unanswered request.
    turn, _ = turns.create_turn(db, rt, who, session.id, parsed.text, "interrupt" if paused else "enqueue")
    return ResponseRef(turn.id, 0)


def wait_for_end(rt: Runtime, who: Principal, ref: ResponseRef, session_id: str, budget: float) -> dict[str, Any]:
    """The response once it is no longer queued or in progress, or as it is after ``budget`` seconds."""
    deadline = time.monotonic() + budget
    while True:
        cursor = rt.events.head(session_id)  # before reading the rows: a change in between still wakes us
        with unit_of_work(rt.sessions, who) as session:
            body = load(session, rt, who, ref).json()
        remaining = deadline - time.monotonic()
        if body["status"] not in ("queued", "in_progress") or remaining <= 0:
            return body
        rt.events.wait(session_id, cursor, min(remaining, 5.0), limit=1)


def _sse(frames: Any) -> Response:
    return Response(frames, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@bp.get("/<response_id>")
def get_response(response_id: str) -> Response:
    rt, who = runtime(), principal()
    ref = ids.parse_response_id(response_id)
    loaded = load(db(), rt, who, ref)
    raw = request.args.get("stream", "false").lower()
    if raw not in ("true", "false"):
        raise BadInput("'stream' must be true or false", field="stream")
    if raw == "false":
        return jsonify(loaded.json())
    starting_after = int_arg("starting_after", -1, lo=0, hi=MAX_CURSOR) if request.args.get("starting_after") \
        else -1
    session_id = loaded.session.id
    db().close()  # a stream holds no connection
    slot = take_stream_slot(rt, who)  # 429 too_many_streams when the user or tenant holds all of theirs
    response = _sse(rechecked(rt, credential(), stream.response_events(rt, who, ref, session_id,
                                                                   starting_after=starting_after),
                              stream.unauthorized_frame))
    response.call_on_close(slot.release)
    return response


@bp.post("/<response_id>/cancel")
def cancel_response(response_id: str) -> Response:
    """Cancel (idempotent): the response ends ``cancelled`` with what it said so far."""
    rt, who = runtime(), principal()
    ref = ids.parse_response_id(response_id)
    loaded = load(db(), rt, who, ref)
    if loaded.seg.last and loaded.seg.turn.status not in TERMINAL:
        turns.cancel_turn(db(), rt, who, ref.turn_id)
        db().commit()
    session_id = loaded.session.id
    db().close()
    deadline = time.monotonic() + CANCEL_WAIT_SECONDS
    while True:  # a running step stops within one delta flush or heartbeat, then commits its partial text
        cursor = rt.events.head(session_id)
        with unit_of_work(rt.sessions, who) as session:
            now = load(session, rt, who, ref)
            body, status = now.json(), now.seg.turn.status
        if status in TERMINAL or not now.seg.last or time.monotonic() >= deadline:
            return jsonify(body)
        rt.events.wait(session_id, cursor, min(1.0, deadline - time.monotonic()), limit=1)


@bp.delete("/<response_id>")
def delete_response(response_id: str) -> Response:
    """Delete the response's turn (its messages stay in the conversation, as OpenAI keeps items)."""
    rt, who = runtime(), principal()
    ref = ids.parse_response_id(response_id)
    loaded = load(db(), rt, who, ref)
    if loaded.seg.turn.status not in TERMINAL:
        raise Conflict(f"response {response_id} is {loaded.json()['status']}; cancel it first")
    conversations.delete_turn(db(), who, loaded.seg.turn)
    db().commit()
    return jsonify({"id": response_id, "object": "response", "deleted": True})


@bp.get("/<response_id>/input_items")
def list_input_items(response_id: str) -> Response:
    loaded = load(db(), runtime(), principal(), ids.parse_response_id(response_id))
    return jsonify(list_json(input_items(loaded.seg, loaded.agent), default_order="desc"))
