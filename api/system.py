"""Health, readiness, metrics and the agent list."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from api.context import db, runtime
from api.errors import error_response
from shared.metrics import exposition

bp = Blueprint("system", __name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
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
    response = error_response(503, "unavailable", "a dependency is down: " + ", ".join(
        f"{k} {v}" for k, v in checks.items() if v != "ok"), retry_after=2)
    return response


@bp.get("/metrics")
def metrics():  # type: ignore[no-untyped-def]
    body, content_type = exposition(runtime().settings)
    return Response(body, content_type=content_type)


@bp.get("/v1/agents")
def list_agents():  # type: ignore[no-untyped-def]
    return jsonify({"data": [a.describe() for a in runtime().agents], "next": None})
