"""Sessions, their history and their event log."""
from __future__ import annotations

from collections.abc import Iterable

from flask import Blueprint, Response, jsonify, request

from api.context import db, float_arg, int_arg, json_body, known_turns, principal, runtime
from api.openapi import AFTER_INT, LIMIT, OBJ, SID, WAIT, RouteDocs, header, op, page, query, ref
from api.relay import recover_gone, waiting_slot
from api.serialize import message_json, session_json, turn_json
from shared.errors import Gone
from shared.streaming.protocol import MAX_CURSOR
from shared.turns import service as turns

bp = Blueprint("sessions", __name__, url_prefix="/v1/sessions")


def describe(agent_names: Iterable[str] = ()) -> RouteDocs:
    """The sessions routes; ``agent_names``, when given, are the only agents a session may be created with."""
    names = sorted(agent_names)
    agent = {"enum": names} if names else {"type": "string", "minLength": 1}
    return RouteDocs({
        "/v1/sessions": {
            "post": op("Create a session", "201", ref("Session"), body="SessionCreate",
                       errors=("400", "401", "413", "429")),
            "get": op("List your sessions, newest first", "200", page("Session"),
                      params=[LIMIT, query("after", {"type": "string"})]),
        },
        "/v1/sessions/{session_id}": {
            "get": op("One session", "200", ref("Session"), params=[SID]),
            "delete": op("Delete a session with its history", "200", OBJ, params=[SID]),
        },
        "/v1/sessions/{session_id}/messages": {
            "get": op("Conversation history, oldest first", "200", page("Message"),
                      params=[SID, LIMIT, AFTER_INT])},
        "/v1/sessions/{session_id}/turns": {
            "post": op("Start a turn (202), or return the same one for a repeated Idempotency-Key (200)", "202",
                       ref("Turn"), body="TurnCreate", errors=("400", "401", "404", "409", "413", "429"),
                       params=[SID, header("Idempotency-Key", "retries with the same key return the same turn")],
                       also={"200": "the turn an earlier request with this Idempotency-Key created"})},
        "/v1/sessions/{session_id}/events": {
            "get": op("Events after a cursor (polling clients)", "200", ref("EventPage"),
                      errors=("400", "401", "404", "410", "429"),
                      params=[SID, AFTER_INT, WAIT, query("limit", {"type": "integer", "minimum": 1,
                                                                    "maximum": 1000})])},
    }, schemas={
        "SessionCreate": {"type": "object", "required": ["agent"], "properties": {
            "agent": agent, "metadata": {"type": ["object", "null"]}}},
        "TurnCreate": {"type": "object", "required": ["input"], "properties": {
            "input": {"type": "string", "minLength": 1}, "on_busy": {"enum": ["enqueue", "reject", "interrupt"]},
            "after_seconds": {"type": "number", "minimum": 0, "maximum": turns.MAX_DELAY_SECONDS,
                              "description": "start the turn this many seconds from now"},
            "at": {"type": "string", "format": "date-time",
                   "description": "start the turn at this time (RFC 3339 with an offset)"}}},
        "EventPage": {"type": "object", "required": ["data", "next"], "properties": {
            "data": {"type": "array", "items": ref("Event")}, "next": {"type": "integer"}}},
    })


@bp.post("")
def create_session() -> tuple[Response, int]:
    body = json_body()
    row = turns.create_session(db(), runtime(), principal(), body.get("agent"), body.get("metadata"))
    db().commit()
    return jsonify(session_json(row)), 201


@bp.get("")
def list_sessions() -> Response:
    limit = int_arg("limit", 20, lo=1, hi=turns.MAX_PAGE)
    rows, nxt = turns.list_sessions(db(), principal(), limit, request.args.get("after") or None)
    return jsonify({"data": [session_json(r) for r in rows], "next": nxt})


@bp.get("/<session_id>")
def get_session(session_id: str) -> Response:
    return jsonify(session_json(turns.get_session(db(), principal(), session_id)))


@bp.delete("/<session_id>")
def delete_session(session_id: str) -> Response:
    turns.delete_session(db(), runtime(), principal(), session_id)
    db().commit()
    return jsonify({"id": session_id, "object": "session", "deleted": True})


@bp.get("/<session_id>/messages")
def list_messages(session_id: str) -> Response:
    limit = int_arg("limit", 50, lo=1, hi=turns.MAX_PAGE)
    after = int_arg("after", 0, lo=0, hi=MAX_CURSOR)
    rows, nxt = turns.list_messages(db(), principal(), session_id, limit, after)
    return jsonify({"data": [message_json(r) for r in rows], "next": nxt})


@bp.post("/<session_id>/turns")
def create_turn(session_id: str) -> tuple[Response, int]:
    body = json_body()
    turn, created = turns.create_turn(
        db(), runtime(), principal(), session_id, body.get("input"), body.get("on_busy"),
        request.headers.get("Idempotency-Key"), after_seconds=body.get("after_seconds"), at=body.get("at"),
    )
    db().commit()
    known_turns().remember(turn.id, turn.tenant_id, turn.user_id, turn.session_id)  # for its long-poll
    return jsonify(turn_json(turn)), (202 if created else 200)


@bp.get("/<session_id>/events")
def list_events(session_id: str) -> Response:
    """Events after a cursor, as JSON: the polling client's stream."""
    rt = runtime()
    after = int_arg("after", 0, lo=0, hi=MAX_CURSOR)
    limit = int_arg("limit", 500, lo=1, hi=1000)
    wait = float_arg("wait", 0.0, lo=0.0, hi=rt.settings.max_wait_seconds)
    turns.get_session(db(), principal(), session_id)
    db().close()  # never hold a connection while waiting
    if wait:
        with waiting_slot(rt, principal()):  # a wait holds a connection: one of the caller's stream slots
            batch = rt.events.wait(session_id, after, wait, limit)
    else:
        batch = rt.events.read(session_id, after, limit)
    if batch.gone:
        raise Gone(recover_gone(rt, principal(), session_id, after))
    # Events are stored as JSON text: spliced, never decoded and re-encoded.
    body = '{"data":[' + ",".join(batch.events) + '],"next":' + str(batch.next) + "}"
    return Response(body, mimetype="application/json")
