"""Errors on the OpenAI-compatible routes, in OpenAI's shape: {"error": {message, type, param, code}}."""
from __future__ import annotations

import math

from flask import Blueprint, Response, jsonify
from werkzeug.exceptions import HTTPException

from shared.errors import NotFound, StepRunError


class ModelNotFound(NotFound):
    code = "model_not_found"


TYPES = {401: "invalid_request_error", 403: "invalid_request_error", 429: "rate_limit_error"}
CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 409: "conflict", 413: "too_large"}


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> Response:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    response = jsonify({"error": {"message": message, "type": kind, "param": param, "code": code}})
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


def install(bp: Blueprint) -> None:
    """Answer every error raised while serving ``bp``'s routes (auth and limits included) in OpenAI's shape."""

    @bp.errorhandler(StepRunError)
    def _domain(exc: StepRunError) -> Response:
        code = CODES.get(exc.status, exc.code)
        if exc.code in ("model_not_found", "not_found", "cursor_expired", "unavailable"):
            code = exc.code
        return openai_error(exc.status, exc.message, param=exc.field, code=code, retry_after=exc.retry_after)

    @bp.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        response = openai_error(status, exc.description or exc.name, code=None)
        valid = getattr(exc, "valid_methods", None)
        if valid:
            response.headers["Allow"] = ", ".join(sorted(valid))
        return response
