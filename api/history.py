"""A turn's trace, a session's export, and erasing everything of the calling user."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, jsonify

from api.context import db, principal, runtime
from api.openapi import OBJ, SID, TID, TS, RouteDocs, op, ref
from api.serialize import message_json, session_json, ts, turn_json
from shared.engine.otel import trace_id_for
from shared.models import TraceSpan
from shared.turns import history
from shared.turns.service import get_turn

bp = Blueprint("history", __name__)


def describe() -> RouteDocs:
    return RouteDocs({
        "/v1/turns/{turn_id}/trace": {"get": op("Spans of the turn: steps, model calls, tool calls", "200",
                                                ref("Trace"), params=[TID])},
        "/v1/sessions/{session_id}/export": {"get": op("The whole session: turns, messages, checkpoint, traces",
                                                       "200", OBJ, params=[SID])},
        "/v1/users/me/data": {"delete": op("Erase everything of the calling user", "200", OBJ,
                                           errors=("401", "429"))},
    }, schemas={
        "Trace": {"type": "object", "required": ["turn_id", "trace_id", "spans"], "properties": {
            "turn_id": {"type": "string"}, "trace_id": {"type": "string"}, "status": {"type": "string"},
            "spans": {"type": "array", "items": {"type": "object", "properties": {
                "span_id": {"type": "string"}, "parent_span_id": {"type": ["string", "null"]},
                "kind": {"enum": ["step", "model", "tool"]}, "name": {"type": "string"},
                "step": {"type": "integer"}, "attempt": {"type": "integer"}, "status": {"type": "string"},
                "started_at": TS, "ended_at": TS, "duration_ms": {"type": "number"},
                "attributes": {"type": "object"}}}}}},
    })


def span_json(row: TraceSpan) -> dict[str, Any]:
    return {
        "span_id": row.span_id,
        "parent_span_id": row.parent_span_id,
        "kind": row.kind,
        "name": row.name,
        "step": row.step,
        "attempt": row.attempt,
        "status": row.status,
        "started_at": ts(row.started_at),
        "ended_at": ts(row.started_at + timedelta(milliseconds=row.duration_ms)),
        "duration_ms": row.duration_ms,
        "attributes": row.attributes,
    }


def trace_json(turn_id: str, spans: list[TraceSpan]) -> dict[str, Any]:
    return {"object": "trace", "turn_id": turn_id, "trace_id": trace_id_for(turn_id),
            "spans": [span_json(s) for s in spans]}


@bp.get("/v1/turns/<turn_id>/trace")
def get_trace(turn_id: str) -> Response:
    """Spans of every committed step of the turn, in start order (an unfinished step has none yet)."""
    turn = get_turn(db(), principal(), turn_id)
    body = trace_json(turn.id, history.list_spans(db(), principal(), turn.id))
    body["status"] = turn.status
    return jsonify(body)


@bp.get("/v1/sessions/<session_id>/export")
def export_session(session_id: str) -> Response:
    data = history.export_session(db(), principal(), session_id)
    by_turn: dict[str, list[TraceSpan]] = {}
    for span in data.spans:
        by_turn.setdefault(span.turn_id, []).append(span)
    checkpoint = data.checkpoint
    return jsonify({
        "object": "session.export",
        "session": session_json(data.session),
        "turns": [turn_json(t) for t in data.turns],
        "messages": [message_json(m) for m in data.messages],
        "checkpoint": None if checkpoint is None else {
            "number": checkpoint.number, "turn_id": checkpoint.turn_id, "step": checkpoint.step,
            "state": {"messages": data.checkpoint_messages}, "created_at": ts(checkpoint.created_at)},
        "traces": [trace_json(t.id, by_turn.get(t.id, [])) for t in data.turns],
    })


@bp.delete("/v1/users/me/data")
def erase_my_data() -> Response:
    """Erase every session (with turns, messages, checkpoints, traces, event logs), memory and own document."""
    report = history.erase_user(db(), runtime(), principal())
    db().commit()
    return jsonify({"object": "user_data.erased", "deleted": report.as_dict()})
