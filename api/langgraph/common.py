"""The /langgraph blueprint and what its route modules share: body parsing, threads, assistants."""
from __future__ import annotations

import json
import re
from typing import Any

from flask import Blueprint, request
from sqlalchemy.exc import IntegrityError

from api.context import db, principal, runtime
from shared.errors import BadInput, Conflict, NotFound, TooLarge
from shared.models import AgentSession
from shared.turns import service as turns

bp = Blueprint("langgraph", __name__, url_prefix="/langgraph")

# A client-chosen thread id (LangGraph clients send UUIDs): it becomes the session id.
THREAD_ID_RE = re.compile(r"^(?!search$)[A-Za-z0-9_-]{1,40}$")
MAX_PAGE = 100


def body_field(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        raise BadInput(f"'{name}' has the wrong type", field=name)
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def paging(body: dict[str, Any]) -> tuple[int, int]:
    limit = body_field(body, "limit", int, 10)
    offset = body_field(body, "offset", int, 0)
    if not 1 <= limit <= MAX_PAGE:
        raise BadInput(f"'limit' must be between 1 and {MAX_PAGE}", field="limit")
    if not 0 <= offset <= 100_000:
        raise BadInput("'offset' must be between 0 and 100000", field="offset")
    return limit, offset


def query_paging() -> tuple[int, int]:
    values: dict[str, Any] = {}
    for name in ("limit", "offset"):
        raw = request.args.get(name)
        if raw not in (None, ""):
            if not raw.isdigit():
                raise BadInput(f"'{name}' must be an integer", field=name)
            values[name] = int(raw)
    return paging(values)


def assistant_name(value: Any) -> str:
    """The agent an ``assistant_id`` names (404 if this deployment serves none by that name)."""
    if not isinstance(value, str) or not value:
        raise BadInput("'assistant_id' is required: the name of an agent", field="assistant_id")
    if runtime().agents.get(value) is None:
        known = ", ".join(a.name for a in runtime().agents)
        raise NotFound(f"no assistant {value!r}; this deployment serves: {known}")
    return value


def check_metadata(metadata: Any) -> dict[str, Any]:
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise BadInput("'metadata' must be a JSON object", field="metadata")
    limit = runtime().settings.max_metadata_bytes
    if len(json.dumps(metadata)) > limit:
        raise TooLarge(f"'metadata' is larger than {limit} bytes", field="metadata")
    return metadata


def own_thread(thread_id: str, *, lock: bool = False) -> AgentSession:
    if THREAD_ID_RE.match(thread_id):
        try:
            return turns.get_session(db(), principal(), thread_id, lock=lock)
        except NotFound:
            pass
    raise NotFound(f"no thread {thread_id!r}")


def create_thread(thread_id: Any, metadata: Any, agent: str = "", if_exists: str = "raise") -> AgentSession:
    """A new thread (a session whose agent its first run binds), or the caller's existing one."""
    metadata = check_metadata(metadata)
    if thread_id is not None:
        if not isinstance(thread_id, str) or not THREAD_ID_RE.match(thread_id):
            raise BadInput("'thread_id' must be 1-40 letters, digits, '-' or '_' (and not 'search')",
                           field="thread_id")
        existing = db().get(AgentSession, thread_id)
        if existing is not None:
            who = principal()
            if if_exists == "do_nothing" and (existing.tenant_id, existing.user_id) == (who.tenant_id, who.user_id):
                return existing
            raise Conflict(f"thread {thread_id} already exists")
    who = principal()
    row = AgentSession(tenant_id=who.tenant_id, user_id=who.user_id, agent=agent, metadata_=metadata)
    if thread_id is not None:
        row.id = thread_id
    try:
        with db().begin_nested():
            db().add(row)
            db().flush()
    except IntegrityError:  # taken, by a thread row-level security hides from this caller
        raise Conflict(f"thread {thread_id} already exists") from None
    return row


def bind_agent(session: AgentSession, agent: str) -> None:
    """A thread's agent is bound by its first run; a later run naming another one is refused."""
    if not session.agent:
        session.agent = agent
    elif session.agent != agent:
        raise BadInput(f"thread {session.id} runs assistant {session.agent!r}, not {agent!r}", field="assistant_id")
