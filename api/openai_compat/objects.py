"""steprun rows as OpenAI objects: responses (segments of turns), conversations and their items.

A turn's history is cut into responses at its pauses (see :mod:`api.openai_compat.ids`).
A *pause step* is a step whose assistant message asked for tool calls it did not
answer itself: the turn waited there for an approval or an answer, which the
next step (the one resuming it) records as tool messages. Every function here
reads committed rows only; the stream (:mod:`api.openai_compat.stream`) names
the same items with the same ids from the event log.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from api.openai_compat import ids
from shared.agent import Agent
from shared.models import AgentSession, Message, Turn, TurnStatus

SERVER_LABEL = "steprun"
DECLINED = "The user declined this action."

# steprun's statuses in OpenAI's words (DESIGN 10.1): a pause ends its response "completed".
STATUS = {
    TurnStatus.QUEUED: "queued", TurnStatus.IN_PROGRESS: "in_progress", TurnStatus.REQUIRES_ACTION: "completed",
    TurnStatus.COMPLETED: "completed", TurnStatus.FAILED: "failed", TurnStatus.CANCELLED: "cancelled",
    TurnStatus.EXPIRED: "failed", TurnStatus.INCOMPLETE: "incomplete",
}


def unix(value: datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp())


@dataclass
class Call:
    """One tool call of an assistant message, with what answered it (if anything did)."""

    step: int
    index: int
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    output: str | None = None
    declined: bool = False
    answered_step: int | None = None


@dataclass
class StepView:
    step: int
    text: str = ""
    text_status: str = "completed"
    calls: list[Call] = field(default_factory=list)
    answers: list[Call] = field(default_factory=list)  # calls of the pause before, answered in this step
    user_input: str | None = None


def steps_of(messages: list[Message]) -> dict[int, StepView]:
    """The turn's committed messages grouped by step, tool calls matched with their answers."""
    views: dict[int, StepView] = {}
    calls: dict[str, Call] = {}
    for m in messages:
        step = m.step or 0
        view = views.setdefault(step, StepView(step))
        if m.role == "user":
            view.user_input = m.content
        elif m.role == "assistant":
            view.text += m.content or ""
            if m.status != "complete":
                view.text_status = "incomplete"
            for part in m.tool_calls or []:
                fn = part.get("function") or {}
                call = Call(step, len(view.calls), str(part.get("id")), str(fn.get("name") or ""),
                            str(fn.get("arguments") or "{}"))
                view.calls.append(call)
                calls[call.id] = call
        elif m.role == "tool":
            answered = calls.get(m.tool_call_id or "")
            if answered is None:
                continue
            call = answered
            call.output, call.answered_step = m.content, step
            call.declined = m.content == DECLINED
            if step != call.step:
                view.answers.append(call)
    return views


def pause_steps(views: dict[int, StepView]) -> list[int]:
    return sorted(s for s, v in views.items() if any(c.answered_step != s for c in v.calls))


def segment_starts(views: dict[int, StepView]) -> list[int]:
    return [0] + [p + 1 for p in pause_steps(views)]


@dataclass
class Segment:
    """The part of a turn one response shows: steps ``start`` .. ``end`` (None: to the turn's end)."""

    turn: Turn
    start: int
    end: int | None
    views: dict[int, StepView]
    previous_start: int | None

    @property
    def id(self) -> str:
        return ids.response_id(self.turn.id, self.start)

    @property
    def last(self) -> bool:
        return self.end is None

    def steps(self) -> list[StepView]:
        return [v for s, v in sorted(self.views.items()) if s >= self.start and (self.end is None or s <= self.end)]


def segment(turn: Turn, messages: list[Message], start: int) -> Segment | None:
    """The segment of ``turn`` starting at ``start``, or None if no response starts there."""
    views = steps_of(messages)
    starts = segment_starts(views)
    if start not in starts:
        return None
    if start > 0 and turn.status == TurnStatus.REQUIRES_ACTION and turn.step_count == start:
        return None  # still paused there: the continuation begins when the client answers
    pauses = [p for p in pause_steps(views) if p >= start]
    position = starts.index(start)
    return Segment(turn, start, pauses[0] if pauses else None, views,
                   starts[position - 1] if position > 0 else None)


def call_item(turn_id: str, call: Call) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "mcp_call", "id": ids.call_item_id(turn_id, call.step, call.index),
                            "server_label": SERVER_LABEL, "name": call.name, "arguments": call.arguments,
                            "output": call.output, "error": None, "status": "completed"}
    if call.declined:
        item.update(output=None, error="declined by the user", status="failed")
    elif call.output is not None and call.output.startswith("error: "):
        item.update(error=call.output[len("error: "):], status="failed")
    return item


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def approval_item(turn_id: str, call: Call) -> dict[str, Any]:
    return {"type": "mcp_approval_request", "id": ids.approval_item_id(turn_id, call.step, call.index),
            "server_label": SERVER_LABEL, "name": call.name, "arguments": call.arguments}


def question_text(call: Call) -> str:
    try:
        return str(json.loads(call.arguments).get("question") or "")
    except (ValueError, AttributeError):
        return ""


def pause_items(turn_id: str, view: StepView, agent: Agent | None) -> list[dict[str, Any]]:
    """What a pause step shows besides its text: approval requests, and questions as text."""
    items = []
    for call in view.calls:
        if call.answered_step == view.step:
            continue
        tool = agent.tool_named(call.name) if agent else None
        if tool is not None and tool.asks_user:
            items.append(message_item(ids.question_item_id(turn_id, call.step, call.index), question_text(call)))
        elif tool is None or tool.requires_approval:
            items.append(approval_item(turn_id, call))
    return items


def output_items(seg: Segment, agent: Agent | None) -> list[dict[str, Any]]:
    turn_id = seg.turn.id
    out: list[dict[str, Any]] = []
    for view in seg.steps():
        out.extend(call_item(turn_id, c) for c in view.answers)
        if view.text:
            out.append(message_item(ids.message_item_id(turn_id, view.step), view.text, view.text_status))
        out.extend(call_item(turn_id, c) for c in view.calls if c.answered_step == view.step)
        if view.step == seg.end:
            out.extend(pause_items(turn_id, view, agent))
    return out


def segment_status(seg: Segment) -> str:
    if not seg.last:
        return "completed"
    return STATUS.get(TurnStatus(seg.turn.status), "in_progress")


def usage_json(turn: Turn) -> dict[str, Any]:
    usage = turn.usage or {}
    inp, out = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": inp + out}


def response_json(seg: Segment, session: AgentSession, agent: Agent | None, *,
                  output: list[dict[str, Any]] | None = None, status: str | None = None) -> dict[str, Any]:
    """The Response object of one segment (``output``/``status`` override what the rows say, for snapshots)."""
    turn = seg.turn
    status = status or segment_status(seg)
    error = None
    incomplete = None
    if seg.last and status == "failed":
        err = turn.error or {}
        if turn.status == TurnStatus.EXPIRED:
            err = {"code": "expired", "message": "the turn waited for the user past its deadline"}
        error = {"code": str(err.get("code") or "server_error"), "message": str(err.get("message") or "failed")}
    if seg.last and status == "incomplete":
        incomplete = {"reason": str((turn.error or {}).get("code") or "max_steps")}
    finished = turn.finished_at if seg.last else None
    return {
        "id": seg.id,
        "object": "response",
        "created_at": unix(turn.created_at),
        "status": status,
        "background": False,
        "completed_at": unix(finished) if status == "completed" else None,
        "conversation": {"id": ids.conversation_id(session.id)},
        "error": error,
        "incomplete_details": incomplete,
        "instructions": None,
        "max_output_tokens": agent.max_output_tokens if agent else None,
        "metadata": {},
        "model": session.agent,
        "output": output_items(seg, agent) if output is None else output,
        "parallel_tool_calls": True,
        "previous_response_id": (ids.response_id(turn.id, seg.previous_start)
                                 if seg.previous_start is not None else None),
        "store": True,
        "temperature": None,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": None,
        "truncation": "disabled",
        "usage": usage_json(turn),
        "user": None,
    }


def input_items(seg: Segment, agent: Agent | None) -> list[dict[str, Any]]:
    """What the client sent to start this response, oldest first."""
    turn_id = seg.turn.id
    if seg.start == 0:
        return [{"type": "message", "id": ids.input_item_id(turn_id), "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": seg.turn.input}]}]
    view = seg.views.get(seg.start)
    items: list[dict[str, Any]] = []
    for call in view.answers if view else []:
        item_id = f"{ids.input_item_id(turn_id, seg.start)}{call.index}"
        tool = agent.tool_named(call.name) if agent else None
        if tool is not None and tool.asks_user:
            items.append({"type": "message", "id": item_id, "role": "user", "status": "completed",
                          "content": [{"type": "input_text", "text": call.output or ""}]})
        elif tool is None or tool.requires_approval:
            items.append({"type": "mcp_approval_response", "id": item_id,
                          "approval_request_id": ids.approval_item_id(turn_id, call.step, call.index),
                          "approve": not call.declined})
    return items


def conversation_json(session: AgentSession) -> dict[str, Any]:
    return {"id": ids.conversation_id(session.id), "object": "conversation",
            "created_at": unix(session.created_at), "metadata": session.metadata_ or {}}


def conversation_items(turns: list[Turn], messages: list[Message], agents: dict[str, Agent | None],
                       agent_name: str) -> list[dict[str, Any]]:
    """A conversation's items, oldest first: inputs, answers, tool calls, approvals and questions."""
    by_turn: dict[str, list[Message]] = {}
    for m in messages:
        by_turn.setdefault(m.turn_id, []).append(m)
    agent = agents.get(agent_name)
    items: list[dict[str, Any]] = []
    seeded = by_turn.pop("", [])
    for m in seeded:  # items given when the conversation was created
        kind = "output_text" if m.role == "assistant" else "input_text"
        items.append({"type": "message", "id": f"msg_seed_{m.id}", "role": m.role, "status": "completed",
                      "content": [{"type": kind, "text": m.content}]})
    for turn in turns:
        rows = by_turn.get(turn.id, [])
        if not rows:
            continue
        views = steps_of(rows)
        for start in segment_starts(views):
            seg = segment(turn, rows, start)
            if seg is None:
                continue
            items.extend(input_items(seg, agent))
            items.extend(output_items(seg, agent))
    return items
