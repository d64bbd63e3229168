"""What a step produces and why it may stop early: the engine's vocabulary, imported by every other engine module.

:class:`StepResult` is the outcome a step commits. :class:`StopReason` names why
a running step was stopped before its end, :class:`StepInterrupted` carries that
reason through the step's stack, and :func:`stopped_outcome` turns a step
stopped early into its result: the partial answer kept (marked ``cancelled`` or
``incomplete``) and tool calls left open answered, so the history stays valid
for any model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.enums import StrValueEnum
from shared.llm.base import (
    ChatMessage,  # the history's message shape, defined beside the model interface
    ModelResponse,
)
from shared.models import TurnStatus
from shared.settings import Settings


def tool_message(call_id: str, name: str | None, content: str) -> ChatMessage:
    """The history entry answering one tool call."""
    return {"role": "tool", "tool_call_id": call_id, "name": name, "content": content}


def for_model(message: ChatMessage) -> ChatMessage:
    """``message`` without the fields only the history table keeps."""
    return {k: v for k, v in message.items() if not k.startswith("_")}  # type: ignore[return-value]  # same keys minus private ones


class StopReason(StrValueEnum):
    """Why a step stopped before its end."""

    CANCELLED = "cancelled"
    LEASE_LOST = "lease_lost"
    STEP_TIME_LIMIT = "step_time_limit"
    TURN_TIME_LIMIT = "turn_time_limit"
    SHUTDOWN = "shutdown"


class StepOutcome(StrValueEnum):
    """What :func:`shared.engine.step.run_step` did when it committed nothing (else it returns the turn status)."""

    SKIPPED = "skipped"          # nothing due: a duplicate delivery, a finished turn, a lease held elsewhere
    ZOMBIE = "zombie"            # this attempt lost its lease; another attempt owns the turn
    PASSED_ON = "passed on"      # the worker is stopping: the step was re-enqueued unclaimed
    HANDED_BACK = "handed back"  # the worker drained mid-step: the step was released and re-enqueued
    RELEASED = "released"        # a transient model error: released for a fresh attempt
    DEFERRED = "deferred"        # its user or tenant runs its cap of turns: waits, unclaimed, for a slot


class StepInterrupted(BaseException):
    """Raised inside the step to stop it: cancelled, lease lost, a time limit, or shutdown.

    A BaseException, like GreenletExit, so that a tool's or a client library's
    ``except Exception`` cannot swallow it and carry on.
    """

    def __init__(self, reason: StopReason):
        super().__init__(reason)
        self.reason = reason


@dataclass
class StepResult:
    """The outcome of one step, committed in one fenced transaction."""

    text: str = ""
    new_messages: list[ChatMessage] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    status: TurnStatus = TurnStatus.IN_PROGRESS  # or a terminal status, or requires_action
    pending: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    # The model's response when no tool call's start recorded it (it asked for none, or none started): recorded
    # by the step's commit, not before it. ``response_maybe_recorded``: a tool call's start that was to record
    # it failed, and may have landed (the commit then tells a repeat apart, and does not count it twice).
    unrecorded_response: ModelResponse | None = None
    response_maybe_recorded: bool = False


def stopped_outcome(result: StepResult, reason: StopReason, settings: Settings, step: int, streamed: str,
                    state: list[ChatMessage]) -> StepResult:
    """Make ``result`` the outcome of a step stopped early; ``streamed`` is the text the model sent so far."""
    status, error = {
        StopReason.CANCELLED: (TurnStatus.CANCELLED, None),
        StopReason.TURN_TIME_LIMIT: (TurnStatus.INCOMPLETE, {
            "code": "max_turn_time",
            "message": f"the turn ran longer than STEPRUN_TURN_TIME_LIMIT ({settings.turn_time_limit:g} s)"}),
        StopReason.STEP_TIME_LIMIT: (TurnStatus.FAILED, {
            "code": "step_time_limit",
            "message": f"step {step} ran longer than STEPRUN_STEP_TIME_LIMIT ({settings.step_time_limit:g} s)"}),
    }[reason]
    result.status, result.error = status, error
    if not any(m["role"] == "assistant" for m in result.new_messages):
        # Stopped while the model streamed: what it said so far goes to the history.
        result.text = streamed
        if streamed:
            result.new_messages.append({"role": "assistant", "content": streamed,
                                        "_status": "cancelled" if reason == StopReason.CANCELLED else "incomplete"})
    close_tool_calls(state, result.new_messages, {
        StopReason.CANCELLED: "not run: the turn was cancelled",
        StopReason.TURN_TIME_LIMIT: "stopped: the turn ran out of time",
        StopReason.STEP_TIME_LIMIT: "stopped: the step ran out of time",
    }[reason])
    return result


def close_tool_calls(state: list[ChatMessage], new: list[ChatMessage], note: str) -> None:
    """Answer tool calls a stopped step left open, so the history stays valid for any model."""
    history = state + new
    for i in range(len(history) - 1, -1, -1):
        if history[i].get("role") != "assistant":
            continue
        answered = {m.get("tool_call_id") for m in history[i + 1:] if m.get("role") == "tool"}
        for call in history[i].get("tool_calls") or []:
            if call["id"] not in answered:
                new.append(tool_message(call["id"], call.get("function", {}).get("name"), note))
        return
