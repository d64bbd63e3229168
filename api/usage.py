"""What the calling user (and their tenant) spent today and this month, against the budgets."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from api.context import principal, runtime
from api.openapi import TS, RouteDocs, op, ref
from shared.auth.principal import SYSTEM
from shared.db import unit_of_work
from shared.turns import budgets

bp = Blueprint("usage", __name__)

_COUNT = {"type": "integer", "minimum": 0}
_LIMIT = {"type": ["integer", "null"], "minimum": 0}
_PERIOD = {"type": "object", "required": ["tokens", "model_calls", "tool_calls", "starts_at", "resets_at"],
           "properties": {"tokens": _COUNT, "model_calls": _COUNT, "tool_calls": _COUNT, "token_limit": _LIMIT,
                          "remaining_tokens": _LIMIT, "starts_at": TS, "resets_at": TS}}
_PERIODS = {"type": "object", "required": ["day", "month"], "properties": {"day": _PERIOD, "month": _PERIOD}}


def describe() -> RouteDocs:
    return RouteDocs({
        "/v1/users/me/usage": {"get": op("Tokens, model calls and tool calls of the calling user and their tenant, "
                                         "this UTC day and month, with the budgets", "200", ref("Usage"),
                                         errors=("401", "429"))},
    }, schemas={
        "Usage": {"type": "object", "required": ["user", "tenant", "per_turn"], "properties": {
            "user": _PERIODS, "tenant": _PERIODS,
            "per_turn": {"type": "object", "properties": {"model_calls": _LIMIT, "tool_calls": _LIMIT}}}},
    })


@bp.get("/v1/users/me/usage")
def my_usage() -> Response:
    rt, who = runtime(), principal()
    # The system scope: the tenant's figures add up its users' counters (only totals are shown).
    with unit_of_work(rt.sessions, SYSTEM) as db:
        report = budgets.usage_report(db, rt.settings, who)
    return jsonify(report)
