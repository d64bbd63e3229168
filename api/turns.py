"""Turns: read (with long-poll), cancel, resume."""
from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from typing import Any

from flask import Blueprint, Response, jsonify

from api.context import db, float_arg, json_body, known_turns, principal, runtime
from api.openapi import TID, WAIT, RouteDocs, op, ref
from api.relay import waiting_slot
from api.serialize import turn_json
from shared.errors import TooManyStreams
from shared.models import ACTIVE
from shared.runtime import Runtime
from shared.turns import events as turn_events
from shared.turns import service as turns

bp = Blueprint("turns", __name__, url_prefix="/v1/turns")


def describe() -> RouteDocs:
    return RouteDocs({
        "/v1/turns/{turn_id}": {
            "get": op("A turn; wait long-polls for a terminal or paused status", "200", ref("Turn"),
                      params=[TID, WAIT])},
        "/v1/turns/{turn_id}/cancel": {"post": op("Cancel (idempotent)", "200", ref("Turn"), params=[TID])},
        "/v1/turns/{turn_id}/resume": {
            "post": op("Continue a requires_action turn", "202", ref("Turn"), body="Resume",
                       errors=("400", "401", "404", "409", "429"), params=[TID])},
    }, schemas={
        "Resume": {"type": "object", "properties": {
            "approve": {"type": "boolean"}, "input": {"type": "string"},
            # For reason tool_outcome_unknown: run the call again, or answer it as not run.
            "tool_outcome": {"enum": ["retry", "skip"]},
            "tool_outputs": {"type": "array", "items": {"type": "object", "required": ["id"],
                                                        "properties": {"id": {"type": "string"}, "output": {}}}}}},
    })


@bp.get("/<turn_id>")
def get_turn(turn_id: str) -> Response:
    rt = runtime()
    who = principal()
    wait = float_arg("wait", 0.0, lo=0.0, hi=rt.settings.max_wait_seconds)
    deadline = time.monotonic() + wait
    session_id = known_turns().session_of(turn_id, who) if wait else None
    if session_id is not None:
        # This process created (or read) the turn: wait on its session at once and read it once, at the end.
        # With every stream slot taken, read it first as below: a turn already over is answered all the same.
        with ExitStack() as held:
            try:
                held.enter_context(waiting_slot(rt, who))
            except TooManyStreams:
                pass
            else:
                return jsonify(turn_json(_wait_for(rt, turn_id, session_id, None, deadline)))
    turn = turns.get_turn(db(), who, turn_id)
    known_turns().remember(turn.id, turn.tenant_id, turn.user_id, turn.session_id)
    # A wait holds a connection like a stream does: one of the caller's stream slots (429 when all are taken).
    with waiting_slot(rt, who) if wait and _running(turn.status) else nullcontext():
        turn = _wait_for(rt, turn_id, turn.session_id, turn, deadline)
    return jsonify(turn_json(turn))


def _wait_for(rt: Runtime, turn_id: str, session_id: str, turn: Any, deadline: float) -> Any:
    """The turn once it is no longer running, or as it is at ``deadline`` (``turn`` None: not read yet)."""
    while turn is None or (_running(turn.status) and time.monotonic() < deadline):
        db().close()  # hold no connection while waiting

        def still_running() -> bool:
            running = _running(turns.get_turn(db(), principal(), turn_id).status)
            db().close()
            return running

        # Wakes on the session's status events only (not its deltas); reads the log's tail, not the turn.
        turn_events.wait_turn_status(rt.events, session_id, turn_id, deadline - time.monotonic(), still_running)
        turn = turns.get_turn(db(), principal(), turn_id)  # the one read after the turn's end
        if _running(turn.status) and time.monotonic() < deadline:
            # The log showed an end the row does not (yet): a resumed turn's old pause, or a publish
            # ahead of its read. Wait for the next status event rather than looking again at once.
            db().close()
            with rt.events.listen(session_id, durable=True) as ring:
                ring.wait(max(0.0, min(deadline - time.monotonic(), 1.0)))
            turn = turns.get_turn(db(), principal(), turn_id)
    return turn


def _running(status: str) -> bool:
    return status in ACTIVE and status != "requires_action"


@bp.post("/<turn_id>/cancel")
def cancel_turn(turn_id: str) -> Response:
    turn = turns.cancel_turn(db(), runtime(), principal(), turn_id)
    db().commit()
    return jsonify(turn_json(turn))


@bp.post("/<turn_id>/resume")
def resume_turn(turn_id: str) -> tuple[Response, int]:
    turn = turns.resume_turn(db(), runtime(), principal(), turn_id, json_body())
    db().commit()
    return jsonify(turn_json(turn)), 202
