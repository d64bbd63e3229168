"""Request-scoped access to the runtime, the database session and the principal."""
from __future__ import annotations

import json
from typing import Any

from flask import current_app, g, request
from sqlalchemy.orm import Session

from shared.auth.principal import Principal
from shared.errors import BadInput
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
    if not _storable(body):
        # JSON may escape a NUL or half a surrogate pair; Postgres can store neither (a 500 otherwise).
        raise BadInput("the body holds a NUL character or an unpaired surrogate (\\u0000, \\ud800...)")
    return body


def _storable(value: Any) -> bool:
    if isinstance(value, str):
        if "\x00" in value:
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_storable(v) for v in value)
    return True


def reject_nul_args() -> None:
    """400 for a query argument holding NUL (Postgres text cannot carry it) or given more than once."""
    for name, values in request.args.lists():
        if "\x00" in name or any("\x00" in v for v in values):
            raise BadInput(f"'{name}' holds a NUL character", field=name.replace("\x00", ""))
        if len(values) > 1 and not (name == "stream_mode" and request.path.startswith("/langgraph/")):
            # Which one would count is a guess: refuse instead (LangGraph's repeated stream_mode is a list).
            raise BadInput(f"'{name}' is given more than once", field=name)


def reject_empty_args(*names: str) -> None:
    """400 for ``?name=`` with nothing after it, where the schema says a number."""
    for name in names:
        if request.args.get(name) == "":
            raise BadInput(f"'{name}' is empty; omit it or give a value", field=name)


def int_arg(name: str, default: int, *, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
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
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadInput(f"'{name}' must be a number", field=name) from None
    if not lo <= value <= hi:
        raise BadInput(f"'{name}' must be between {lo:g} and {hi:g}", field=name)
    return value
