"""Health, readiness, metrics and the agent list."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from api.context import db, runtime
from api.errors import error_response
from api.openapi import OBJ, RouteDocs, op, page
from shared.metrics import exposition

bp = Blueprint("system", __name__)


def describe() -> RouteDocs:
    return RouteDocs({
        "/healthz": {"get": op("Liveness", "200", OBJ, errors=(), secured=False)},
        "/readyz": {"get": op("Readiness: database and event log reachable", "200", OBJ, errors=("503",),
                              secured=False)},
        "/metrics": {"get": op("Prometheus metrics", "200", {"type": "string"}, errors=(), secured=False,
                               content_type="text/plain")},
        "/v1/agents": {"get": op("Agents served here", "200", page("Agent"), errors=("401", "429"))},
    }, schemas={
        "Agent": {"type": "object", "required": ["name", "tools"], "properties": {
            "name": {"type": "string"}, "description": {"type": "string"}, "model": {"type": "string"},
            "max_steps": {"type": "integer"}, "tools": {"type": "array", "items": {"type": "object"}}}},
    })


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    checks = {}
    try:
        db().execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - readiness reports, it does not raise
        checks["database"] = f"down: {type(exc).__name__}"
    try:
        runtime().events.ping()
        checks["events"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["events"] = f"down: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return jsonify({"status": "ready", "checks": checks})
    return error_response(503, "unavailable", "a dependency is down: " + ", ".join(
        f"{k} {v}" for k, v in checks.items() if v != "ok"), retry_after=2)


@bp.get("/metrics")
def metrics() -> Response:
    body, content_type = exposition(runtime().settings)
    return Response(body, content_type=content_type)


@bp.get("/v1/agents")
def list_agents() -> Response:
    return jsonify({"data": [a.describe() for a in runtime().agents], "next": None})
