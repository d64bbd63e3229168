"""Running the tools a model asked for, and turning a user's answer to a pause into tool results."""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from shared.agent import Agent, ToolContext
from shared.engine.buffer import StepEvents
from shared.engine.claim import Claim, StepInput
from shared.engine.outcome import ChatMessage, tool_message
from shared.storage.context import tool_storage

log = logging.getLogger(__name__)


def idempotency_key(claim: Claim, call_id: str) -> str:
    """The key a tool gets to dedupe its side effect: the same for every attempt that sees this call."""
    return f"{claim.turn_id}:{claim.step}:{call_id}"


def run_tool(agent: Agent, claim: Claim, step: StepInput, call: dict[str, Any], events: StepEvents) -> ChatMessage:
    """Run one tool call; its output (or the error, which the model is told) becomes the tool message."""
    events.check()
    tool = agent.tool_named(call["name"])
    started = time.monotonic()
    events.in_tool = True
    try:
        if tool is None:
            raise LookupError(f"no tool named {call['name']!r}")
        ctx = ToolContext(
            tenant_id=step.tenant_id, user_id=step.user_id, session_id=step.session_id,
            turn_id=claim.turn_id, idempotency_key=idempotency_key(claim, call["id"]),
            **tool_storage(events.rt, claim.principal),
        )
        value = tool.invoke(call["arguments"], ctx)
        output = value if isinstance(value, str) else json.dumps(value, default=str)
        error = None
    except Exception as exc:  # noqa: BLE001 - the model is told, and may recover
        output, error = f"error: {type(exc).__name__}: {exc}", True
        # The operator sees it too, with where it happened and the traceback.
        log.warning("turn %s step %s: tool %s (call %s) raised %s: %s", claim.turn_id, claim.step, call["name"],
                    call["id"], type(exc).__name__, exc, exc_info=True)
    finally:
        events.in_tool = False
    events.trace.tool_finished(call, output, error, started)
    events.add("tool.result", {"id": call["id"], "output": output, "error": error,
                               "duration_ms": round((time.monotonic() - started) * 1000, 2)})
    events.check()
    return tool_message(call["id"], call["name"], output)


def answer_pending(agent: Agent, claim: Claim, step: StepInput, events: StepEvents) -> list[ChatMessage]:
    """Turn the user's answer to a pause into the tool results the model will see."""
    resume, pending = step.resume or {}, step.pending or {}
    outputs = {o["id"]: o.get("output") for o in resume.get("tool_outputs") or []}
    questions = {q["id"] for q in pending.get("questions") or []}
    messages = []
    for call in pending.get("tool_calls", []):
        if call["id"] in outputs:
            output = outputs[call["id"]]
            content = output if isinstance(output, str) else json.dumps(output)
            events.add("tool.result", {"id": call["id"], "output": content})
            messages.append(tool_message(call["id"], call["name"], content))
        elif call["id"] in questions:
            answer = resume.get("input") or ""
            events.add("tool.result", {"id": call["id"], "output": answer})
            messages.append(tool_message(call["id"], call["name"], answer))
        elif call["id"] in pending.get("needs_approval", []) and not resume.get("approve"):
            content = "The user declined this action."
            events.add("tool.result", {"id": call["id"], "output": content, "declined": True})
            messages.append(tool_message(call["id"], call["name"], content))
        else:
            messages.append(run_tool(agent, claim, step, call, events))
    return messages
