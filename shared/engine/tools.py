"""Running the tools a model asked for, through the journal, and turning a user's answer to a pause into results.

Per tool call, one of (the ``journal`` field of its ``tool.result`` event and trace span):

- ``ran``: journaled as started (committed), run, its result recorded at once;
- ``reused``: an earlier attempt recorded its result: not run again;
- ``rerun``: an earlier attempt died while it ran (outcome unknown) and the tool is
  ``@tool(idempotent=True)``: run again, with the same idempotency key;
- ``retried`` / ``skipped`` / ``answered``: the outcome was unknown, the tool is not
  idempotent, and the user chose (resume ``tool_outcome``: retry or skip, or gave the
  output in ``tool_outputs``).

An unknown outcome of a tool that is not idempotent raises :class:`ToolOutcomeUnknown`:
the step pauses the turn (``requires_action``, reason ``tool_outcome_unknown``) or
fails it, per STEPRUN_TOOL_OUTCOME_UNKNOWN.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from shared.agent import Agent, ToolContext
from shared.engine.buffer import StepEvents
from shared.engine.claim import Claim, StepInput
from shared.engine.journal import StepJournal, fenced, finish_tool_call, start_tool_call
from shared.engine.outcome import ChatMessage, StepInterrupted, StopReason, tool_message
from shared.metrics import TOOL_JOURNAL
from shared.storage.context import tool_storage

log = logging.getLogger(__name__)


SKIPPED_OUTPUT = ("not run again: an earlier attempt started this call and died before its result was recorded, "
                  "and the user chose to skip it")


def idempotency_key(turn_id: str, step: int, call_id: str) -> str:
    """The key a tool gets to dedupe its side effect: the same for every attempt that sees this call.

    Stable because a retried step reuses the model's recorded response (the same call ids).
    """
    return f"{turn_id}:{step}:{call_id}"


class ToolOutcomeUnknown(Exception):  # noqa: N818 - named for the pause reason it becomes
    """A call an earlier attempt started and never recorded, of a tool that is not idempotent."""

    def __init__(self, call: dict[str, Any], started_at: str, attempt: int, answered: list[ChatMessage],
                 remaining: list[dict[str, Any]]):
        super().__init__(f"the outcome of tool call {call['id']} ({call['name']}) is unknown")
        # ``attempt``: the fencing number of the attempt that started it and died.
        self.call, self.started_at, self.attempt = call, started_at, attempt
        # The step whose model asked for the call (set by whoever ran the batch).
        self.call_step: int | None = None
        # Results of the calls before it, and the calls still to answer (this one first).
        self.answered, self.remaining = answered, remaining


def run_tools(agent: Agent, claim: Claim, step: StepInput, calls: list[dict[str, Any]], events: StepEvents,
              journal: StepJournal, *, call_step: int) -> list[ChatMessage]:
    """Run ``calls`` in order; raises ToolOutcomeUnknown carrying what was answered before it."""
    messages: list[ChatMessage] = []
    for i, call in enumerate(calls):
        try:
            messages.append(run_tool(agent, claim, step, call, events, journal, call_step=call_step))
        except ToolOutcomeUnknown as unknown:
            unknown.answered, unknown.remaining, unknown.call_step = messages, calls[i:], call_step
            raise
    return messages


def run_tool(agent: Agent, claim: Claim, step: StepInput, call: dict[str, Any], events: StepEvents,
             journal: StepJournal, *, call_step: int, resolution: tuple[str, int] | None = None) -> ChatMessage:
    """Run one tool call through the journal; its output (or the error, which the model is told) is the message.

    ``call_step``: the step whose model asked for the call (the key and the journal row
    belong to it). ``resolution``: the user's answer to its unknown outcome (retry or
    skip) and the attempt it answers about: a retry that itself died is asked about anew.
    """
    events.check()
    tool = agent.tool_named(call["name"])
    key = idempotency_key(claim.turn_id, call_step, call["id"])
    entry = journal.entry(call_step, call["id"])
    how = "ran"
    if entry is not None and entry.status != "started":
        return _reused(call, entry.output or "", entry.error, events)
    if entry is not None:  # started by an attempt that died: did the side effect happen? Nobody knows.
        choice = resolution[0] if resolution is not None and resolution[1] == entry.attempt else None
        if choice == "skip":
            finish_tool_call(events.rt, claim, call_step, call["id"], SKIPPED_OUTPUT, False, status="skipped")
            return _resolved(call, SKIPPED_OUTPUT, "skipped", events)
        if choice == "retry":
            how = "retried"
        elif tool is not None and tool.idempotent:
            how = "rerun"
            events.add("tool.outcome_unknown", {"id": call["id"], "name": call["name"], "policy": "rerun",
                                                "idempotency_key": key, "started_attempt": entry.attempt})
        else:
            raise ToolOutcomeUnknown(call, entry.started_at.isoformat(), entry.attempt, [], [])
    # The model's answer, if not recorded yet, is recorded with this start: before the tool runs.
    journal.response_maybe_recorded = journal.unrecorded_response is not None
    start_tool_call(events.rt, claim, call_step, call, key, response=journal.unrecorded_response)
    journal.unrecorded_response, journal.response_maybe_recorded = None, False
    started = time.monotonic()
    events.in_tool = True
    try:
        if tool is None:
            raise LookupError(f"no tool named {call['name']!r}")
        ctx = ToolContext(
            tenant_id=step.tenant_id, user_id=step.user_id, session_id=step.session_id,
            turn_id=claim.turn_id, idempotency_key=key,
            **tool_storage(events.rt, claim.principal, _fence_for(claim)),
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
    # Recorded before anything else can fail: from here on a retried attempt reuses this result.
    record_tool_result(events, claim, call_step, call["id"], output, bool(error))
    TOOL_JOURNAL.labels(outcome=how).inc()
    events.trace.tool_finished(call, output, error, started, journal=how)
    events.add("tool.result", {"id": call["id"], "output": output, "error": error, "journal": how,
                               "duration_ms": round((time.monotonic() - started) * 1000, 2)})
    events.check()
    return tool_message(call["id"], call["name"], output)


def _fence_for(claim: Claim) -> Callable[[Session], None]:
    """A tool's memory write goes through only while its turn is still this attempt's: a write after the
    user's data was erased (the turn row is gone) or after the lease moved on raises, writing nothing."""
    def fence(db: Session) -> None:
        if not fenced(db, claim):
            raise StepInterrupted(StopReason.LEASE_LOST)
    return fence


def record_tool_result(events: StepEvents, claim: Claim, step: int, call_id: str, output: str, error: bool) -> None:
    """The journal write right after a tool returns (a seam the chaos tests kill the worker around)."""
    finish_tool_call(events.rt, claim, step, call_id, output, error)


def _reused(call: dict[str, Any], output: str, error: bool, events: StepEvents) -> ChatMessage:
    TOOL_JOURNAL.labels(outcome="reused").inc()
    events.trace.tool_finished(call, output, error or None, time.monotonic(), journal="reused")
    events.add("tool.result", {"id": call["id"], "output": output, "error": error or None, "journal": "reused"})
    return tool_message(call["id"], call["name"], output)


def _resolved(call: dict[str, Any], output: str, how: str, events: StepEvents) -> ChatMessage:
    TOOL_JOURNAL.labels(outcome=how).inc()
    events.trace.tool_finished(call, output, None, time.monotonic(), journal=how)
    events.add("tool.result", {"id": call["id"], "output": output, "journal": how})
    return tool_message(call["id"], call["name"], output)


def answer_pending(agent: Agent, claim: Claim, step: StepInput, events: StepEvents,
                   journal: StepJournal) -> list[ChatMessage]:
    """Turn the user's answer to a pause into the tool results the model will see.

    Raises ToolOutcomeUnknown if a call this answer runs was left unknown by a dead attempt of this step.
    """
    resume, pending = step.resume or {}, step.pending or {}
    call_step = pending_call_step(claim, pending)
    outputs = {o["id"]: o.get("output") for o in resume.get("tool_outputs") or []}
    questions = {q["id"] for q in pending.get("questions") or []}
    unknown = {u["id"]: u.get("attempt") for u in pending.get("unknown") or []}
    calls = pending.get("tool_calls", [])
    messages: list[ChatMessage] = []
    for i, call in enumerate(calls):
        if call["id"] in outputs:
            output = outputs[call["id"]]
            content = output if isinstance(output, str) else json.dumps(output)
            if call["id"] in unknown:  # the user says what the call did: that is its result now
                finish_tool_call(events.rt, claim, call_step, call["id"], content, False, status="succeeded")
                messages.append(_resolved(call, content, "answered", events))
                continue
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
            choice, about = resume.get("tool_outcome"), unknown.get(call["id"])
            resolution = (choice, about) if choice and isinstance(about, int) else None
            try:
                messages.append(run_tool(agent, claim, step, call, events, journal, call_step=call_step,
                                         resolution=resolution))
            except ToolOutcomeUnknown as stop:
                stop.answered, stop.remaining, stop.call_step = messages, calls[i:], call_step
                raise
    return messages


def pending_call_step(claim: Claim, pending: dict[str, Any]) -> int:
    """The step whose model asked for a pause's tool calls (the pause's commit was the step before this one)."""
    value = pending.get("call_step")
    return int(value) if isinstance(value, int) else claim.step - 1
