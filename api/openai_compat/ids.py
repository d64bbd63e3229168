"""The ids an OpenAI client sees, and the steprun rows they name.

A response is one *segment* of a turn: the turn's steps from its first one (or
from the step that continues a pause) up to a pause or the end. The segment
that starts at step 0 is ``resp_<turn hex>``; the one that continues the pause
at step ``p`` is ``resp_<turn hex>_<p + 1>``. So a response id names its turn
and its first step, and nothing needs storing besides the turn itself. Output
items are named by turn, step and position, so every replay, poll and list
names an item the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.errors import NotFound

TURN, SESSION = "turn_", "ses_"


def _hex(row_id: str, prefix: str) -> str:
    return row_id[len(prefix):] if row_id.startswith(prefix) else row_id


@dataclass(frozen=True)
class ResponseRef:
    turn_id: str
    start: int  # the first step of the segment

    @property
    def id(self) -> str:
        return response_id(self.turn_id, self.start)


def response_id(turn_id: str, start: int = 0) -> str:
    base = "resp_" + _hex(turn_id, TURN)
    return base if start == 0 else f"{base}_{start}"


def parse_response_id(value: str) -> ResponseRef:
    """The turn and first step a response id names; 404 (OpenAI's words) for anything else."""
    body = value[len("resp_"):] if value.startswith("resp_") else ""
    hex_, _, start = body.partition("_")
    if not hex_ or not hex_.isalnum() or len(hex_) > 64 or (start and not start.isdigit()) or len(start) > 9:
        raise NotFound(f"No response found with id '{value}'.", field="response_id")
    return ResponseRef(TURN + hex_, int(start or 0))


def conversation_id(session_id: str) -> str:
    return "conv_" + _hex(session_id, SESSION)


def parse_conversation_id(value: str, field: str = "conversation_id") -> str:
    body = value[len("conv_"):] if value.startswith("conv_") else ""
    if not body or not body.isalnum() or len(body) > 64:
        raise NotFound(f"No conversation found with id '{value}'.", field=field)
    return SESSION + body


def message_item_id(turn_id: str, step: int) -> str:
    return f"msg_{_hex(turn_id, TURN)}_{step}"


def input_item_id(turn_id: str, step: int = 0) -> str:
    return f"msg_{_hex(turn_id, TURN)}_{step}_in"


def question_item_id(turn_id: str, step: int, index: int) -> str:
    return f"msg_{_hex(turn_id, TURN)}_{step}_q{index}"


def call_item_id(turn_id: str, step: int, index: int) -> str:
    return f"mcp_{_hex(turn_id, TURN)}_{step}_{index}"


def approval_item_id(turn_id: str, step: int, index: int) -> str:
    return f"mcpr_{_hex(turn_id, TURN)}_{step}_{index}"


def parse_approval_id(value: str) -> tuple[str, int, int] | None:
    """(turn id, step, call index) of an ``mcp_approval_request`` id, or None."""
    if not value.startswith("mcpr_"):
        return None
    parts = value[len("mcpr_"):].split("_")
    if len(parts) != 3 or not parts[0].isalnum() or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return TURN + parts[0], int(parts[1]), int(parts[2])
