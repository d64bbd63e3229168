"""steprun's rows in LangGraph's words: threads, runs, states and LangChain message dicts.

assistant = agent, thread = session, run = turn, interrupt = a turn paused in
``requires_action``. Message ids are derived from where a message sits (its
turn, its step, its role), never from the database row, so that a message chunk
streamed before its step commits carries the id the committed message will have.
"""
from __future__ import annotations

import json
from typing import Any

from api.serialize import ts
from shared.models import AgentSession, Message, Turn, TurnStatus

# DESIGN 10.2: run statuses.
RUN_STATUS = {
    TurnStatus.QUEUED: "pending",
    TurnStatus.IN_PROGRESS: "running",
    TurnStatus.REQUIRES_ACTION: "interrupted",
    TurnStatus.COMPLETED: "success",
    TurnStatus.FAILED: "error",
    TurnStatus.INCOMPLETE: "error",
    TurnStatus.EXPIRED: "timeout",
    TurnStatus.CANCELLED: "interrupted",
}
# LangGraph's multitask_strategy -> steprun's on_busy. A rollback first deletes the active run and
# those waiting (shared.turns.service.rollback_session), so the new run finds the thread idle.
ON_BUSY = {"reject": "reject", "enqueue": "enqueue", "interrupt": "interrupt", "rollback": "enqueue"}
# The node names a step's messages are reported under, as in LangGraph's prebuilt ReAct agent.
AGENT_NODE, TOOLS_NODE = "agent", "tools"


def ai_message_id(turn_id: str, step: int) -> str:
    return f"{turn_id}-{step}-ai"


def message_id(row: Message) -> str:
    step = row.step or 0
    if row.role == "assistant":
        return ai_message_id(row.turn_id, step)
    if row.role == "user":
        return f"{row.turn_id}-{step}-human"
    if row.role == "tool":
        return f"{row.turn_id}-{step}-tool-{row.tool_call_id}"
    return f"msg-{row.id}"


def _tool_calls(parts: list[Any] | None) -> list[dict[str, Any]]:
    calls = []
    for part in parts or []:
        function = part.get("function") or {}
        raw = function.get("arguments")
        try:
            args = json.loads(raw) if isinstance(raw, str) else (raw or {})
        except ValueError:
            args = {"__raw__": raw}
        calls.append({"name": function.get("name"), "args": args, "id": part.get("id"), "type": "tool_call"})
    return calls


def message_dict(row: Message) -> dict[str, Any]:
    """A history row as a LangChain message dict (``human`` / ``ai`` / ``tool`` / ``system``)."""
    common: dict[str, Any] = {"content": row.content, "id": message_id(row), "additional_kwargs": {},
                              "response_metadata": {}, "name": None}
    if row.role == "assistant":
        return {"type": "ai", **common, "tool_calls": _tool_calls(row.tool_calls), "invalid_tool_calls": [],
                "usage_metadata": None}
    if row.role == "tool":
        return {"type": "tool", **common, "name": row.name, "tool_call_id": row.tool_call_id,
                "status": "success", "artifact": None}
    if row.role == "user":
        return {"type": "human", **common}
    return {"type": "system", **common}


def human_dict(turn: Turn) -> dict[str, Any]:
    """The run's input as the human message it becomes when its first step commits."""
    return {"type": "human", "content": turn.input, "id": f"{turn.id}-0-human", "additional_kwargs": {},
            "response_metadata": {}, "name": None}


def ai_chunk(message_id_: str, content: str, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One ``AIMessageChunk`` of the ``messages-tuple`` stream."""
    calls = tool_calls or []
    return {
        "type": "AIMessageChunk", "content": content, "id": message_id_, "additional_kwargs": {},
        "response_metadata": {}, "name": None, "tool_calls": calls, "invalid_tool_calls": [],
        "tool_call_chunks": [{"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i,
                              "type": "tool_call_chunk"} for i, c in enumerate(calls)],
        "usage_metadata": None,
    }


def interrupt_of(turn_id: str, pending: dict[str, Any] | None) -> dict[str, Any]:
    """A paused turn's pending action as a LangGraph ``Interrupt`` (value, id)."""
    return {"value": pending or {}, "id": f"{turn_id}-interrupt"}


def run_json(turn: Turn, assistant_id: str, multitask_strategy: str | None = None) -> dict[str, Any]:
    return {
        "run_id": turn.id,
        "thread_id": turn.session_id,
        "assistant_id": assistant_id,
        "created_at": ts(turn.created_at),
        "updated_at": ts(turn.finished_at or turn.started_at or turn.created_at),
        "status": RUN_STATUS.get(TurnStatus(turn.status), "pending"),
        "metadata": {},
        "multitask_strategy": multitask_strategy or ("reject" if turn.on_busy == "reject" else turn.on_busy),
        "kwargs": {},
    }


def thread_status(session: AgentSession, active: Turn | None, last: Turn | None) -> str:
    """DESIGN 10.2: idle, busy, interrupted or error."""
    if active is not None:
        return "interrupted" if active.status == TurnStatus.REQUIRES_ACTION else "busy"
    if last is not None and last.status in (TurnStatus.FAILED, TurnStatus.INCOMPLETE, TurnStatus.EXPIRED):
        return "error"
    return "idle"


def thread_metadata(session: AgentSession) -> dict[str, Any]:
    metadata = dict(session.metadata_ or {})
    if session.agent:  # LangGraph adds these on a thread's first run; UIs filter on them
        metadata.setdefault("graph_id", session.agent)
        metadata.setdefault("assistant_id", session.agent)
    return metadata


def assistant_json(name: str, description: str = "") -> dict[str, Any]:
    return {
        "assistant_id": name, "graph_id": name, "name": name, "description": description or None,
        "config": {}, "context": {}, "metadata": {}, "version": 1,
        "created_at": "1970-01-01T00:00:00Z", "updated_at": "1970-01-01T00:00:00Z",
    }
