"""Request-scoped access to the runtime, the database session and the principal."""
from __future__ import annotations

import json
from typing import Any

from flask import current_app, g, request
from sqlalchemy.orm import Session

from shared.errors import BadInput
from shared.keys import Principal
from shared.runtime import Runtime


def runtime() -> Runtime:
    return current_app.extensions["steprun"]


def db() -> Session:
    """The request's database session, opened on first use, closed at teardown."""
    if "db" not in g:
        g.db = runtime().sessions()
    return g.db


def principal() -> Principal:
    return g.principal


def json_body() -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadInput("the body must be a JSON object")
    return body


def int_arg(name: str, default: int, *, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadInput(f"'{name}' must be an integer", field=name) from None
    if not lo <= value <= hi:
        raise BadInput(f"'{name}' must be between {lo} and {hi}", field=name)
    return value


def float_arg(name: str, default: float, *, lo: float, hi: float) -> float:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadInput(f"'{name}' must be a number", field=name) from None
    if not lo <= value <= hi:
        raise BadInput(f"'{name}' must be between {lo:g} and {hi:g}", field=name)
    return value
