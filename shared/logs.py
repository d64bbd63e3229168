"""Logging setup, done by each entrypoint (never at import)."""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from shared.settings import Settings

# The ids of the work at hand (request_id, session_id, turn_id, step), added to every log
# line. Set by the API per request and by the step code per step. A new greenlet or
# thread starts with an empty context (none is inherited), so each binds its own.
# Only ever replaced, never mutated (the default is read-only and shared).
_LOG_CONTEXT: ContextVar[Mapping[str, Any]] = ContextVar("steprun_log_context", default=MappingProxyType({}))
# Terminal colour codes (werkzeug colours its request lines): never written to a log file or a JSON line.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(process)d: %(message)s%(log_context)s"


def bind_log_context(**values: Any) -> Token[Mapping[str, Any]]:
    """Add ids to the current context (None values are ignored); returns the token to reset it."""
    merged = {**_LOG_CONTEXT.get(), **{k: v for k, v in values.items() if v is not None}}
    return _LOG_CONTEXT.set(merged)


def reset_log_context(token: Token[Mapping[str, Any]]) -> None:
    _LOG_CONTEXT.reset(token)


@contextmanager
def log_context(**values: Any) -> Iterator[None]:
    """Ids carried by every log line written inside the block (and only there)."""
    token = bind_log_context(**values)
    try:
        yield
    finally:
        _LOG_CONTEXT.reset(token)


class ContextFilter(logging.Filter):
    """Copies the context's ids onto each record (as attributes, and as text for the plain format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _LOG_CONTEXT.get()
        record.steprun_context = context
        record.log_context = (" [" + " ".join(f"{k}={v}" for k, v in context.items()) + "]") if context else ""
        return True


class TextFormatter(logging.Formatter):
    """The plain format without terminal colour codes, one record per line: a newline inside a message
    (an id from a request) is escaped, so no input can forge a log line. Tracebacks keep their lines."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        return line.replace("\r", "\\r").replace("\n", "\\n") if ("\n" in line or "\r" in line) else line

    def format(self, record: logging.LogRecord) -> str:
        return ANSI_ESCAPE.sub("", super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, process, the context's ids, any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": ANSI_ESCAPE.sub("", record.getMessage()),
            "process": record.process,
        }
        entry.update(getattr(record, "steprun_context", None) or _LOG_CONTEXT.get())
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(settings: Settings, handler: logging.Handler | None = None) -> None:
    """Root logger at ``STEPRUN_LOG_LEVEL``; every root handler gets the format (``STEPRUN_LOG_FORMAT``) and ids.

    Handlers already on the root (Celery's, for one) are reformatted rather than
    duplicated, so a process logs each line once, in one format.
    """
    root = logging.getLogger()
    root.setLevel(settings.log_level.upper())
    if handler is not None:
        root.addHandler(handler)
    elif not root.handlers:
        root.addHandler(logging.StreamHandler())
    formatter = JsonFormatter() if settings.log_format == "json" else TextFormatter()
    for h in root.handlers:
        h.setFormatter(formatter)
        if not any(isinstance(f, ContextFilter) for f in h.filters):
            h.addFilter(ContextFilter())
