"""Turns: read (with long-poll), cancel, resume."""
from __future__ import annotations

import time

from flask import Blueprint, jsonify

from api.context import db, float_arg, json_body, principal, runtime
from api.serialize import turn_json
from shared.models import ACTIVE
from shared.turns import service as turns

bp = Blueprint("turns", __name__, url_prefix="/v1/turns")


@bp.get("/<turn_id>")
def get_turn(turn_id: str):  # type: ignore[no-untyped-def]
    rt = runtime()
    wait = float_arg("wait", 0.0, lo=0.0, hi=rt.settings.max_wait_seconds)
    turn = turns.get_turn(db(), principal(), turn_id)
    deadline = time.monotonic() + wait
    while _running(turn.status) and time.monotonic() < deadline:
        # Every status change publishes an event: read the log's head *before*
        # re-reading the turn, so a change in between still wakes the wait.
        cursor = rt.events.head(turn.session_id)
        db().close()  # hold no connection while waiting
        turn = turns.get_turn(db(), principal(), turn_id)
        if not _running(turn.status):
            break
        db().close()
        rt.events.wait(turn.session_id, cursor, max(0.0, min(deadline - time.monotonic(), 5.0)), limit=1)
        turn = turns.get_turn(db(), principal(), turn_id)
    return jsonify(turn_json(turn))


def _running(status: str) -> bool:
    return status in ACTIVE and status != "requires_action"


@bp.post("/<turn_id>/cancel")
def cancel_turn(turn_id: str):  # type: ignore[no-untyped-def]
    turn = turns.cancel_turn(db(), runtime(), principal(), turn_id)
    db().commit()
    return jsonify(turn_json(turn))


@bp.post("/<turn_id>/resume")
def resume_turn(turn_id: str):  # type: ignore[no-untyped-def]
    turn = turns.resume_turn(db(), runtime(), principal(), turn_id, json_body())
    db().commit()
    return jsonify(turn_json(turn)), 202
