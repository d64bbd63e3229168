"""A run's events translated into LangGraph stream frames (``values``, ``updates``, ``messages``...).

The translation is a pure function of the session's event log and the
committed history: every frame gets the id ``<cursor>-<n>`` (the n-th frame of
the event at that cursor), so a stream reopened anywhere, by any API process,
translates the same events into the same frames with the same ids, and a
reconnect with ``Last-Event-ID`` skips exactly what the client already has.

Token chunks (``messages-tuple``) are live, with one rule for recovery: a step
whose attempt died is run again from its checkpoint, and its new attempt's text
is sent only past what the client already received for that step. Chunks are
never repeated; a retried model call that says something *different* from the
dead attempt cannot be un-sent, so the stream stops chunking that step and its
committed message arrives in ``values``/``updates`` (``STEPRUN_LANGGRAPH_CHUNKS=
committed`` sends each step's text only once it is committed, which always
equals the history). Everything else (tool calls, tool results, state) comes
from the committed history, never from an attempt's events.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from api.langgraph.convert import AGENT_NODE, TOOLS_NODE, ai_chunk, ai_message_id, interrupt_of

STREAM_MODES = ("values", "updates", "messages-tuple", "messages", "custom", "debug", "events", "tasks",
                "checkpoints")
# What steprun produces; the other LangGraph modes are accepted and send nothing (README).
PRODUCED = frozenset({"values", "updates", "messages-tuple", "messages"})
# A join without stream_mode gets LangGraph's "union of all stream modes" that steprun produces.
JOIN_DEFAULT = ("values", "updates", "messages-tuple")
# The n of a frame position standing for "after every frame of this cursor".
AFTER_ALL = 1 << 30


def parse_position(raw: str | None) -> tuple[int, int] | None:
    """A frame id (``C-n``, or ``C`` for "after cursor C") as a comparable position; None if not one."""
    if not raw:
        return None
    cursor, _, n = raw.strip().partition("-")
    if not cursor.isdigit() or (n and not n.isdigit()) or len(raw) > 40:
        return None
    return int(cursor), (int(n) if n else AFTER_ALL)


def frame_id(position: tuple[int, int]) -> str:
    return str(position[0]) if position[1] == AFTER_ALL else f"{position[0]}-{position[1]}"


@dataclass
class Frame:
    position: tuple[int, int]
    event: str
    data: Any


class RunReader(Protocol):
    """The committed facts a translation needs (read when a step has committed, so they no longer change)."""

    def values(self, step: int) -> list[dict[str, Any]]:
        """The thread's messages after ``step`` of the run (-1: before its first step, input included)."""
        ...

    def step_messages(self, step: int) -> list[dict[str, Any]]:
        """The messages ``step`` of the run committed, as LangChain message dicts."""
        ...

    def pending(self) -> dict[str, Any] | None:
        """What the paused run waits for."""
        ...


@dataclass
class _StepText:
    attempt: int = 0
    attempt_text: str = ""
    sent: str = ""          # messages-tuple: text the client was sent for this step, across attempts
    partial: str = ""       # messages: the last cumulative text sent
    diverged: bool = False
    announced: bool = False  # messages: messages/metadata sent for this message id


@dataclass
class RunTranslator:
    run_id: str
    thread_id: str
    assistant_id: str
    modes: frozenset[str]
    reader: RunReader
    committed_chunks: bool = False
    ended: bool = False
    steps: dict[int, _StepText] = field(default_factory=dict)

    def translate(self, cursor: int, event: dict[str, Any]) -> list[Frame]:
        """The frames of one event of this run (``ended`` is set by the event that ends its stream)."""
        out: list[Frame] = []

        def emit(name: str, data: Any) -> None:
            out.append(Frame((cursor, len(out)), name, data))

        kind, data = event.get("type"), event.get("data") or {}
        handler: Callable[[dict[str, Any], Callable[[str, Any], None]], None] | None = {
            "turn.queued": self._queued, "turn.started": self._started, "step.retrying": self._retrying,
            "message.delta": self._delta, "step.completed": self._committed,
            "turn.requires_action": self._paused,
        }.get(str(kind))
        if handler is not None:
            handler(data, emit)
        elif kind in ("turn.completed", "turn.cancelled"):
            emit("end", None)
            self.ended = True
        elif kind in ("turn.failed", "turn.incomplete", "turn.expired"):
            error = data.get("error") or {}
            emit("error", {"error": error.get("code") or str(kind).removeprefix("turn."),
                           "message": error.get("message") or f"the run ended: {kind}"})
            self.ended = True
        return out

    def metadata(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "attempt": 1}

    def _meta(self, step: int, node: str = AGENT_NODE) -> dict[str, Any]:
        return {"run_id": self.run_id, "thread_id": self.thread_id, "assistant_id": self.assistant_id,
                "graph_id": self.assistant_id, "langgraph_node": node, "langgraph_step": step + 1,
                "langgraph_triggers": [f"branch:to:{node}"], "langgraph_path": ["__pregel_pull", node],
                "langgraph_checkpoint_ns": f"{node}:{self.run_id}-{step}"}

    def _queued(self, data: dict[str, Any], emit: Callable[[str, Any], None]) -> None:
        emit("metadata", self.metadata())

    def _started(self, data: dict[str, Any], emit: Callable[[str, Any], None]) -> None:
        if "values" in self.modes:
            emit("values", {"messages": self.reader.values(-1)})

    def _retrying(self, data: dict[str, Any], emit: Callable[[str, Any], None]) -> None:
        state = self.steps.setdefault(int(data.get("step", 0)), _StepText())
        attempt = int(data.get("attempt", 0))
        if attempt > state.attempt:
            state.attempt, state.attempt_text = attempt, ""

    def _delta(self, data: dict[str, Any], emit: Callable[[str, Any], None]) -> None:
        step, attempt = int(data.get("step", 0)), int(data.get("attempt", 0))
        state = self.steps.setdefault(step, _StepText())
        if attempt < state.attempt:
            return  # an earlier (dead or fenced-off) attempt of this step: never shown
        if attempt > state.attempt:
            state.attempt, state.attempt_text = attempt, ""
        state.attempt_text += str(data.get("text") or "")
        message_id = ai_message_id(self.run_id, step)
        if "messages" in self.modes and state.attempt_text != state.partial:
            if not state.announced:
                emit("messages/metadata", {message_id: {"metadata": self._meta(step)}})
                state.announced = True
            # Cumulative: a retried attempt's different text simply replaces the earlier one.
            emit("messages/partial", [_ai_dict(message_id, state.attempt_text)])
            state.partial = state.attempt_text
        if "messages-tuple" in self.modes and not self.committed_chunks and not state.diverged:
            if state.attempt_text.startswith(state.sent):
                new = state.attempt_text[len(state.sent):]
                if new:
                    emit("messages", [ai_chunk(message_id, new), self._meta(step)])
                    state.sent = state.attempt_text
            elif not state.sent.startswith(state.attempt_text):
                state.diverged = True

    def _committed(self, data: dict[str, Any], emit: Callable[[str, Any], None]) -> None:
        step = int(data.get("step", 0))
        state = self.steps.setdefault(step, _StepText())
        messages = [m for m in self.reader.step_messages(step) if m["type"] != "human"]
        if "messages-tuple" in self.modes:
            for m in messages:
                if m["type"] == "ai":
                    content = str(m.get("content") or "")
                    # The committed text past what was streamed (all of it when chunks wait for the commit).
                    rest = content[len(state.sent):] if content.startswith(state.sent) and not state.diverged else ""
                    if rest:
                        emit("messages", [ai_chunk(m["id"], rest), self._meta(step)])
                        state.sent = content
                    if m.get("tool_calls"):
                        emit("messages", [ai_chunk(m["id"], "", m["tool_calls"]), self._meta(step)])
                else:
                    emit("messages", [m, self._meta(step, TOOLS_NODE)])
        if "messages" in self.modes and messages:
            for m in messages:
                if m["type"] == "ai" and not state.announced:
                    emit("messages/metadata", {m["id"]: {"metadata": self._meta(step)}})
                    state.announced = True
            emit("messages/complete", messages)
        if "updates" in self.modes:
            for node, group in _by_node(messages):
                emit("updates", {node: {"messages": group}})
        if "values" in self.modes:
            emit("values", {"messages": self.reader.values(step)})

    def _paused(self, data: dict[str, Any], emit: Callable[[str, Any], None]) -> None:
        if "updates" in self.modes:
            emit("updates", {"__interrupt__": [interrupt_of(self.run_id, self.reader.pending()
                                                            or data.get("pending"))]})
        emit("end", None)
        self.ended = True


def _ai_dict(message_id: str, content: str) -> dict[str, Any]:
    return {"type": "ai", "content": content, "id": message_id, "additional_kwargs": {}, "response_metadata": {},
            "name": None, "tool_calls": [], "invalid_tool_calls": [], "usage_metadata": None}


def _by_node(messages: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Consecutive messages grouped under the node that produced them (agent: ai; tools: tool)."""
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for m in messages:
        node = AGENT_NODE if m["type"] == "ai" else TOOLS_NODE
        if groups and groups[-1][0] == node:
            groups[-1][1].append(m)
        else:
            groups.append((node, [m]))
    return groups
