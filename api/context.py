"""Request-scoped access to the runtime, the database session and the principal."""
from __future__ import annotations

from typing import Any

from flask import current_app, g, request
from sqlalchemy.orm import Session

from api.input_gate import ascii_int, ascii_number, parse_json
from api.known_turns import KnownTurns
from shared.auth.principal import Principal
from shared.errors import BadInput
from shared.runtime import Runtime


def runtime() -> Runtime:
    return current_app.extensions["steprun"]


def known_turns() -> KnownTurns:
    return current_app.extensions["steprun.known_turns"]


def db() -> Session:
    """The request's database session, opened on first use, closed at teardown."""
    if "db" not in g:
        g.db = runtime().sessions()
    return g.db


def principal() -> Principal:
    return g.principal


def json_body() -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it (see api/input_gate.py)."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise BadInput("the body must be a JSON object")
    return body


def reject_empty_args(*names: str) -> None:
    """400 for ``?name=`` with nothing after it, where the schema says a number."""
    for name in names:
        if request.args.get(name) == "":
            raise BadInput(f"'{name}' is empty; omit it or give a value", field=name)


def int_arg(name: str, default: int, *, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    value = ascii_int(name, raw)
    if not lo <= value <= hi:
        raise BadInput(f"'{name}' must be between {lo} and {hi}", field=name)
    return value


def float_arg(name: str, default: float, *, lo: float, hi: float) -> float:
    raw = request.args.get(name)
    if raw is None:
        return default
    value = ascii_number(name, raw)
    if not lo <= value <= hi:
        raise BadInput(f"'{name}' must be between {lo:g} and {hi:g}", field=name)
    return value
