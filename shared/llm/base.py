"""The one streaming interface every model speaks.

Messages are OpenAI Chat Completions dicts (``role``, ``content``,
``tool_calls``, ``tool_call_id``): the checkpoint stores them as they are, so any
model can continue any conversation.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypedDict

from typing_extensions import NotRequired


class ToolCallPart(TypedDict):
    """One tool call as an assistant message carries it (OpenAI chat shape)."""

    id: str
    type: Literal["function"]
    function: dict[str, str]


class ChatMessage(TypedDict):
    """One message of a session's history, as checkpoints store it and models receive it."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: NotRequired[list[ToolCallPart]]
    tool_call_id: NotRequired[str]
    name: NotRequired[str | None]
    # Kept in the history table only (message status), never sent to a model.
    _status: NotRequired[str]


class ModelError(Exception):
    """The provider refused the request; retrying will not help (HTTP 400, bad model ...)."""


class TransientModelError(Exception):
    """The provider failed in a way a later attempt may not (429, 5xx, timeout)."""


@dataclass
class ToolCallRequest:
    id: str
    name: str
    arguments: dict[str, Any]

    def as_message_part(self) -> ToolCallPart:
        import json

        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class ModelResponse:
    text: str
    tool_calls: list[ToolCallRequest] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    finish_reason: str = "stop"
    # Seconds from the request to the first streamed token (None if nothing streamed).
    time_to_first_token: float | None = None


# Called with each text fragment as it streams. It may raise to abort the call
# (cancellation): the model must let the exception propagate.
OnDelta = Callable[[str], None]


class Model(Protocol):
    name: str

    def generate(
        self,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]],
        on_delta: OnDelta,
        *,
        max_output_tokens: int | None = None,
    ) -> ModelResponse:
        """Stream one completion: call ``on_delta`` per text fragment, return the whole."""
        ...
