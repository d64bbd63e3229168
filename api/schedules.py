"""Schedules: turns that start themselves on a cron expression or every N seconds (DESIGN section 11.1)."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from api.context import db, int_arg, json_body, principal, runtime
from api.openapi import AFTER_PAGE, LIMIT, TS, RouteDocs, op, page, path_param, ref
from api.serialize import ts, turn_json
from shared.models import Schedule
from shared.schedules import service as schedules

bp = Blueprint("schedules", __name__, url_prefix="/v1/schedules")
SCHED = path_param("schedule_id")
MAX_PAGE = 100


def describe() -> RouteDocs:
    return RouteDocs({
        "/v1/schedules": {
            "post": op("Create a schedule: input sent to agent on cron (in timezone) or every_seconds", "201",
                       ref("Schedule"), body="ScheduleCreate", errors=("400", "401", "404", "409", "413", "429")),
            "get": op("Your schedules, newest first", "200", page("Schedule"), params=[LIMIT, AFTER_PAGE]),
        },
        "/v1/schedules/{schedule_id}": {
            "get": op("One schedule", "200", ref("Schedule"), params=[SCHED]),
            "patch": op("Pause, resume or change a schedule (a new timing counts from now)", "200", ref("Schedule"),
                        body="ScheduleUpdate", params=[SCHED], errors=("400", "401", "404", "413", "429")),
            "delete": op("Delete a schedule (its runs stay)", "200", ref("Deleted"), params=[SCHED]),
        },
        "/v1/schedules/{schedule_id}/runs": {
            "get": op("The turns the schedule started, newest first", "200", page("Turn"),
                      params=[SCHED, LIMIT, AFTER_PAGE])},
    }, schemas={
        "Schedule": {"type": "object", "required": ["id", "object", "agent", "input", "cron", "every_seconds",
                                                    "timezone", "session_id", "paused", "next_run_at",
                                                    "created_at"],
                     "properties": {
                         "id": {"type": "string"}, "object": {"const": "schedule"}, "agent": {"type": "string"},
                         "input": {"type": "string"}, "cron": {"type": ["string", "null"]},
                         "every_seconds": {"type": ["integer", "null"]}, "timezone": {"type": "string"},
                         "session_id": {"type": ["string", "null"]}, "metadata": {"type": "object"},
                         "paused": {"type": "boolean"}, "next_run_at": TS, "last_run_at": TS,
                         "run_count": {"type": "integer"}, "last_error": {"type": ["object", "null"]},
                         "created_at": TS, "updated_at": TS}},
        "ScheduleCreate": {"type": "object", "required": ["agent", "input"], "properties": {
            "agent": {"type": "string"}, "input": {"type": "string", "minLength": 1},
            "cron": {"type": "string", "description": "5 fields: minute hour day-of-month month day-of-week"},
            "every_seconds": {"type": "integer", "minimum": 1}, "timezone": {"type": "string"},
            "session_id": {"type": "string"}, "metadata": {"type": "object"}}},
        "ScheduleUpdate": {"type": "object", "properties": {
            "paused": {"type": "boolean"}, "cron": {"type": "string"}, "every_seconds": {"type": "integer"},
            "input": {"type": "string", "minLength": 1}, "timezone": {"type": "string"},
            "metadata": {"type": "object"}}},
        "Deleted": {"type": "object", "required": ["id", "deleted"], "properties": {
            "id": {"type": "string"}, "object": {"type": "string"}, "deleted": {"const": True}}},
    })


def schedule_json(row: Schedule) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "schedule",
        "agent": row.agent,
        "input": row.input,
        "cron": row.cron,
        "every_seconds": row.every_seconds,
        "timezone": row.timezone,
        "session_id": row.session_id,
        "metadata": row.metadata_,
        "paused": row.paused,
        "next_run_at": None if row.paused else ts(row.next_run_at),
        "last_run_at": ts(row.last_run_at),
        "run_count": row.run_count,
        "last_error": row.last_error,
        "created_at": ts(row.created_at),
        "updated_at": ts(row.updated_at),
    }


@bp.post("")
def create_schedule() -> tuple[Response, int]:
    row = schedules.create_schedule(db(), runtime(), principal(), json_body())
    db().commit()
    return jsonify(schedule_json(row)), 201


@bp.get("")
def list_schedules() -> Response:
    limit = int_arg("limit", 20, lo=1, hi=MAX_PAGE)
    rows, nxt = schedules.list_schedules(db(), principal(), limit, request.args.get("after") or None)
    return jsonify({"data": [schedule_json(r) for r in rows], "next": nxt})


@bp.get("/<schedule_id>")
def get_schedule(schedule_id: str) -> Response:
    return jsonify(schedule_json(schedules.get_schedule(db(), principal(), schedule_id)))


@bp.patch("/<schedule_id>")
def update_schedule(schedule_id: str) -> Response:
    row = schedules.update_schedule(db(), runtime(), principal(), schedule_id, json_body())
    db().commit()
    return jsonify(schedule_json(row))


@bp.delete("/<schedule_id>")
def delete_schedule(schedule_id: str) -> Response:
    schedules.delete_schedule(db(), principal(), schedule_id)
    db().commit()
    return jsonify({"id": schedule_id, "object": "schedule.deleted", "deleted": True})


@bp.get("/<schedule_id>/runs")
def list_runs(schedule_id: str) -> Response:
    limit = int_arg("limit", 20, lo=1, hi=MAX_PAGE)
    rows, nxt = schedules.list_runs(db(), principal(), schedule_id, limit, request.args.get("after") or None)
    return jsonify({"data": [turn_json(r) for r in rows], "next": nxt})
