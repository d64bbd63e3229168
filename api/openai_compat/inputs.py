"""What a client may send as a response's ``input`` (DESIGN 10.1), read into steprun's terms."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.errors import BadInput

MAX_ITEMS = 1000
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = {"input_text", "output_text", "text"}


@dataclass
class Input:
    text: str | None = None                           # the new user text (trailing user messages, joined)
    history: list[dict[str, str]] = field(default_factory=list)  # messages before it
    approvals: list[tuple[str, bool, str]] = field(default_factory=list)  # (request id, approve, param)


def message_text(item: dict[str, Any], where: str) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadInput(f"{where}.content must be a string or a list of input_text parts", field=f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise BadInput(f"{where}.content[{j}]: parts of type {kind!r} are not supported; send input_text parts",
                           field=f"{where}.content[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def message(item: dict[str, Any], where: str) -> dict[str, str]:
    role = item.get("role")
    if role not in ROLES:
        raise BadInput(f"{where}.role must be one of user, assistant, system, developer", field=f"{where}.role")
    return {"role": ROLES[role], "content": message_text(item, where)}


def parse_input(value: Any) -> Input:
    """``input`` as text, earlier history and approval answers; 400 naming the item for anything else."""
    if isinstance(value, str):
        if not value.strip():
            raise BadInput("'input' must not be empty", field="input")
        return Input(text=value)
    if not isinstance(value, list) or not value:
        raise BadInput("'input' is required: a string, or a list of message and mcp_approval_response items",
                       field="input")
    if len(value) > MAX_ITEMS:
        raise BadInput(f"'input' has more than {MAX_ITEMS} items", field="input")
    parsed = Input()
    messages: list[dict[str, str]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadInput(f"{where} must be an object", field=where)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            if parsed.approvals:
                raise BadInput(f"{where}: send mcp_approval_response items on their own", field=where)
            messages.append(message(item, where))
        elif kind == "mcp_approval_response":
            request_id, approve = item.get("approval_request_id"), item.get("approve")
            if not isinstance(request_id, str) or not isinstance(approve, bool):
                raise BadInput(f"{where}: an mcp_approval_response needs approval_request_id (string) and "
                               "approve (true or false)", field=where)
            if messages:
                raise BadInput(f"{where}: send mcp_approval_response items on their own", field=where)
            parsed.approvals.append((request_id, approve, where))
        else:
            raise BadInput(f"{where}: items of type {kind!r} are not supported here; send message or "
                           "mcp_approval_response items", field=where)
    if parsed.approvals:
        return parsed
    trailing = len(messages)
    while trailing > 0 and messages[trailing - 1]["role"] == "user":
        trailing -= 1
    new = messages[trailing:]
    if not new:
        raise BadInput("'input' must end with a user message", field=f"input[{len(value) - 1}]")
    parsed.history = messages[:trailing]
    parsed.text = "\n\n".join(m["content"] for m in new)
    if not parsed.text.strip():
        raise BadInput("the user message is empty", field="input")
    return parsed
