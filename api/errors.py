"""Every error leaves the API as {"error": {"code", "message"[, "field"]}} with the right status."""
from __future__ import annotations

import logging
import math

from flask import Flask, Response, jsonify
from sqlalchemy.exc import DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException

from shared.db import database_unavailable
from shared.errors import RequestTimeout, StepRunError

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, *, field: str | None = None,
                   retry_after: float | None = None) -> Response:
    body: dict[str, str] = {"code": code, "message": message}
    if field:
        body["field"] = field
    response = jsonify({"error": body})
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(StepRunError)
    def _domain(exc: StepRunError) -> Response:
        return error_response(exc.status, exc.code, exc.message, field=exc.field, retry_after=exc.retry_after)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        # werkzeug reports a failed body read as a 400 (ClientDisconnected); one past STEPRUN_BODY_TIMEOUT
        # (api/gunicorn_worker.py) is the client's slowness, said as such.
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, RequestTimeout):
            return _domain(cause)
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 400: "invalid_request"}.get(
            exc.code or 500, "http_error")
        message = exc.description or exc.name
        if exc.code == 404:
            message = "no such route"
        response = error_response(exc.code or 500, code, message)
        valid = getattr(exc, "valid_methods", None)
        if valid:  # RFC 9110: a 405 names the methods that are allowed
            response.headers["Allow"] = ", ".join(sorted(valid))
        return response

    @app.errorhandler(OperationalError)
    def _db_down(exc: OperationalError) -> Response:
        log.warning("database unavailable: %s", exc)
        return error_response(503, "unavailable", "the database is unavailable; retry shortly", retry_after=2)

    @app.errorhandler(DBAPIError)
    def _db_error(exc: DBAPIError) -> Response:
        # A dropped connection ("connection already closed", invalidated) is an outage, not a bug.
        if database_unavailable(exc):
            log.warning("database unavailable: %s", exc)
            return error_response(503, "unavailable", "the database is unavailable; retry shortly", retry_after=2)
        log.exception("database error")
        return error_response(500, "internal_error", "internal error")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        import redis

        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            return error_response(503, "unavailable", "the event store is unavailable; retry shortly",
                                  retry_after=2)
        if database_unavailable(exc):  # e.g. the pool timed out waiting for a connection
            log.warning("database unavailable: %s", exc)
            return error_response(503, "unavailable", "the database is unavailable; retry shortly", retry_after=2)
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error")
