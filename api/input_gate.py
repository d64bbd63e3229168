"""One gate for everything a client sends: JSON bodies and frames, path ids, query arguments, headers.

Whatever cannot be stored or used safely is a 400 naming the field, before a
view runs and before anything is written:

- JSON with ``NaN``/``Infinity``/a number that overflows to infinity (``1e999``),
  nesting deeper than :data:`MAX_DEPTH`, a NUL or an unpaired surrogate in any
  string or key (Postgres text can hold neither);
- a path id or an id-like header holding a control character (a NUL breaks
  the database, a newline forges a log line) or longer than :data:`MAX_ID_CHARS`;
- a query argument holding NUL or given twice; a number that is not plain
  ASCII digits (``int()`` alone accepts ``1_0`` and ``٣``).

The same :func:`parse_json` serves HTTP bodies and WebSocket frames. Every walk
here is iterative and linear in the input, so a hostile input costs no more
than its size (which the body limit bounds).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from flask import request

from shared.errors import BadInput

MAX_DEPTH = 64
MAX_ID_CHARS = 256
# Headers the app reads as ids or cursors: checked like path ids.
ID_HEADERS = ("X-User-Id", "Idempotency-Key", "Last-Event-ID")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_INT = re.compile(r"-?[0-9]{1,19}", re.ASCII)
_NUMBER = re.compile(r"-?[0-9]{1,19}(\.[0-9]{1,19})?", re.ASCII)


class _Bad:
    """Stands in, while parsing, for a number JSON cannot carry; the walk reports where it sits."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _constant(text: str) -> _Bad:
    return _Bad(text)  # NaN, Infinity, -Infinity


def _float(text: str) -> float | _Bad:
    value = float(text)
    return value if math.isfinite(value) else _Bad(text)


def _depth_ok(text: str) -> bool:
    """True unless brackets nest deeper than MAX_DEPTH; a linear scan that skips strings."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return True
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def parse_json(raw: bytes | str, *, what: str = "the body") -> Any:
    """Parse JSON a client sent, or raise a 400 that says what is wrong and where."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise BadInput(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not _depth_ok(text):
        raise BadInput(f"{what} nests JSON deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float)
    except RecursionError:  # unreachable past the depth scan; kept so it can never be a 500
        raise BadInput(f"{what} nests JSON deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise BadInput(f"{what} is not valid JSON ({exc})") from None
    check_storable(value, what=what)
    return value


def _path(parts: tuple[str | int, ...]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def check_storable(value: Any, *, what: str = "the body") -> None:
    """400 naming the first field that holds NUL, an unpaired surrogate or a non-finite number."""
    stack: list[tuple[tuple[str | int, ...], Any, int]] = [((), value, 0)]
    while stack:
        path, item, depth = stack.pop()
        field = _path(path) or None
        if depth > MAX_DEPTH:
            raise BadInput(f"{what} nests deeper than {MAX_DEPTH} levels", field=field)
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                raise BadInput(f"{what}: {field or 'the value'} {problem}", field=field)
        elif isinstance(item, _Bad):
            raise BadInput(f"{what}: {field or 'the value'} is {item.text}, which JSON numbers cannot be "
                           "(use a finite number)", field=field)
        elif isinstance(item, float) and not math.isfinite(item):
            raise BadInput(f"{what}: {field or 'the value'} is not a finite number", field=field)
        elif isinstance(item, dict):
            for key, child in item.items():
                problem = text_problem(key) if isinstance(key, str) else None
                if problem:
                    raise BadInput(f"{what}: a key of {field or 'the object'} {problem}", field=field)
                stack.append(((*path, key), child, depth + 1))
        elif isinstance(item, list):
            for index, child in enumerate(item):
                stack.append(((*path, index), child, depth + 1))


def text_problem(text: str) -> str | None:
    """Why Postgres text cannot hold ``text`` (NUL, an unpaired surrogate), or None."""
    if "\x00" in text:
        return "holds a NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds an unpaired surrogate (\\ud800-\\udfff)"
    return None


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot be an id (a path segment or an id header), or None."""
    if len(value) > MAX_ID_CHARS:
        return f"is longer than {MAX_ID_CHARS} characters"
    if _CONTROL.search(value):
        return "holds a control character (NUL, newline, ...)"
    return text_problem(value)


def ascii_int(name: str, raw: str) -> int:
    """``raw`` as an integer written in plain ASCII digits, or a 400 naming ``name``."""
    if not _INT.fullmatch(raw):
        raise BadInput(f"'{name}' must be an integer (ASCII digits)", field=name)
    return int(raw)


def ascii_number(name: str, raw: str) -> float:
    """``raw`` as a decimal number written in plain ASCII, or a 400 naming ``name``."""
    if not _NUMBER.fullmatch(raw):
        raise BadInput(f"'{name}' must be a number (ASCII digits, optionally a decimal point)", field=name)
    return float(raw)


def gate_request() -> None:
    """Before any view (and any authentication): path ids, query arguments and id headers."""
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str):
            problem = id_problem(value)
            if problem:
                raise BadInput(f"the path's {name} {problem}", field=name)
    for name, values in request.args.lists():
        problem = text_problem(name) or next((p for p in map(text_problem, values) if p), None)
        if problem:
            clean = name.replace("\x00", "").encode("utf-8", "replace").decode()
            raise BadInput(f"'{clean}' {problem}", field=clean)
        if len(values) > 1 and not (name == "stream_mode" and request.path.startswith("/langgraph/")):
            # Which one would count is a guess: refuse instead (LangGraph's repeated stream_mode is a list).
            raise BadInput(f"'{name}' is given more than once", field=name)
    for header in ID_HEADERS:
        value = request.headers.get(header)
        if value is not None:
            problem = id_problem(value)
            if problem:
                raise BadInput(f"the {header} header {problem}", field=header)
