"""One reasoning step of one turn: claim, load, run, commit, publish, continue.

This is the code every worker (Celery or the embedded thread pool) runs. It is
written so that duplicates are harmless and crashes lose nothing:

1. :func:`claim_turn` takes a lease with a single conditional UPDATE that bumps
   the fencing number (``attempt``). A task for a finished turn, for a step
   already committed, or for a turn whose lease another worker holds, claims
   nothing and exits quietly.
2. The latest checkpoint is loaded and the connection released: no database
   connection is held across the model call.
3. The model streams; deltas are batched into events; a background watch
   extends the lease, flushes deltas and notices a cancel request.
4. :func:`_commit` writes checkpoint, messages and turn progress in one
   transaction that first checks the fencing number, so a zombie attempt (its
   lease expired and another took over) commits nothing.
5. After the commit, events are published and the next step enqueued.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from shared.agent import Agent, ToolContext
from shared.conversations import finish_turn, publish_after_commit
from shared.db import SYSTEM, unit_of_work
from shared.events import encode_event
from shared.llm import ModelError, ModelResponse, TransientModelError, build_model
from shared.models import AgentSession, Checkpoint, Message, Turn, utcnow
from shared.runtime import Runtime, after_commit

log = logging.getLogger(__name__)
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


class StepInterrupted(Exception):
    """Raised inside the model stream to stop it: cancelled, or the lease was lost."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Claim:
    turn_id: str
    session_id: str
    step: int
    attempt: int
    step_attempt: int
    # The principal the turn belongs to: every later transaction of the step is scoped to it.
    tenant_id: str = ""
    user_id: str = ""


@dataclass
class StepResult:
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    new_messages: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    status: str = "in_progress"  # or a terminal status, or requires_action
    pending: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def claim_turn(db: Session, turn_id: str, step: int, worker_id: str, lease_seconds: float) -> Claim | None:
    """Take the lease on ``turn_id`` for ``step``; None if someone else should (or did) run it."""
    now = utcnow()
    active = select(AgentSession.active_turn_id).where(AgentSession.id == Turn.session_id).scalar_subquery()
    row = db.execute(
        update(Turn)
        .where(
            Turn.id == turn_id,
            Turn.step_count == step,
            Turn.status.in_(("queued", "in_progress")),
            or_(Turn.lease_expires_at.is_(None), Turn.lease_expires_at < now),
            Turn.id == active,
        )
        .values(
            attempt=Turn.attempt + 1,
            step_attempt=Turn.step_attempt + 1,
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            status="in_progress",
            started_at=func.coalesce(Turn.started_at, now),
        )
        .returning(Turn.session_id, Turn.attempt, Turn.step_attempt, Turn.tenant_id, Turn.user_id)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    return Claim(turn_id, row.session_id, step, row.attempt, row.step_attempt, row.tenant_id, row.user_id)


def run_step(rt: Runtime, turn_id: str, step: int, worker_id: str = WORKER_ID) -> str:
    """Run step ``step`` of ``turn_id`` if it is still due. Returns what happened, for logs and tests."""
    # The claim looks a turn up by id alone: the one cross-tenant read of a step.
    with unit_of_work(rt.sessions, SYSTEM) as db:
        claim = claim_turn(db, turn_id, step, worker_id, rt.settings.lease_seconds)
    if claim is None:
        return "skipped"
    with unit_of_work(rt.sessions, claim) as db:
        turn = db.get(Turn, turn_id)
        session = db.get(AgentSession, claim.session_id)
        assert turn is not None and session is not None
        checkpoint = db.scalars(
            select(Checkpoint).where(Checkpoint.session_id == session.id)
            .order_by(Checkpoint.number.desc()).limit(1)
        ).first()
        state = list(checkpoint.state["messages"]) if checkpoint else []
        context = dict(
            tenant_id=turn.tenant_id, user_id=turn.user_id, session_id=session.id, agent_name=session.agent,
            input=turn.input, resume=turn.resume, pending=turn.pending, cancel=turn.cancel_requested,
        )
    # The connection is back in the pool before the model is called.
    agent = rt.agents.get(context["agent_name"])
    events = _StepEvents(rt, claim)
    if claim.step_attempt > rt.settings.max_attempts:
        reason = f"step {step} failed {claim.step_attempt - 1} times (worker lost or provider unavailable)"
        return _commit(rt, claim, StepResult(status="failed", error={"code": "max_attempts", "message": reason}),
                       state, events)
    if claim.step_attempt > 1:
        events.add("step.retrying", {"step": step, "attempt": claim.step_attempt,
                                     "reason": "the previous attempt did not finish"})
    elif step == 0:
        events.add("turn.started", {})
    events.add("step.started", {"step": step, "attempt": claim.step_attempt})
    if agent is None:
        error = {"code": "unknown_agent", "message": f"agent {context['agent_name']!r} is not served here"}
        return _commit(rt, claim, StepResult(status="failed", error=error), state, events)
    if context["cancel"]:
        return _commit(rt, claim, StepResult(status="cancelled"), state, events)

    watch = _StepWatch(rt, claim, events)
    watch.start()
    try:
        result = _execute(rt, agent, claim, context, state, events)
    except StepInterrupted as stop:
        if stop.reason == "lease_lost":
            log.warning("turn %s step %s: lease lost, attempt %s abandoned", turn_id, step, claim.attempt)
            return "zombie"
        result = StepResult(text=events.text, status="cancelled")
        if events.text:
            result.new_messages.append({"role": "assistant", "content": events.text, "_status": "cancelled"})
    except TransientModelError as exc:
        # Hand the step back: the next attempt starts from the same checkpoint.
        watch.stop()
        _release(rt, claim)
        log.warning("turn %s step %s: transient model error, retrying: %s", turn_id, step, exc)
        rt.queue.enqueue_step(turn_id, step)
        return "released"
    except ModelError as exc:
        result = StepResult(status="failed", error={"code": "model_error", "message": str(exc)[:2000]})
    except Exception as exc:  # noqa: BLE001 - an agent's own bug fails its turn, not the worker
        log.exception("turn %s step %s raised", turn_id, step)
        result = StepResult(status="failed", error={"code": "agent_error",
                                                    "message": f"{type(exc).__name__}: {exc}"[:2000]})
    finally:
        watch.stop()
    return _commit(rt, claim, result, state, events)


def _execute(rt: Runtime, agent: Agent, claim: Claim, context: dict[str, Any], state: list[dict[str, Any]],
             events: "_StepEvents") -> StepResult:
    result = StepResult()
    if claim.step == 0 and not context["resume"]:
        result.new_messages.append({"role": "user", "content": context["input"]})
    if context["resume"] and context["pending"]:
        result.new_messages.extend(_answer_pending(agent, claim, context, events))
    messages = state + [{k: v for k, v in m.items() if not k.startswith("_")} for m in result.new_messages]
    model = build_model(agent.model, rt.settings)
    prompt = ([{"role": "system", "content": agent.instructions}] if agent.instructions else []) + messages
    response: ModelResponse = model.generate(
        prompt, [t.schema() for t in agent.tools], events.delta, max_output_tokens=agent.max_output_tokens
    )
    events.flush()
    result.text = response.text
    result.usage = {"input_tokens": response.usage.input_tokens, "output_tokens": response.usage.output_tokens}
    assistant: dict[str, Any] = {"role": "assistant", "content": response.text}
    if response.tool_calls:
        assistant["tool_calls"] = [c.as_message_part() for c in response.tool_calls]
    result.new_messages.append(assistant)
    if response.finish_reason == "length":
        result.status, result.error = "incomplete", {"code": "max_output_tokens",
                                                     "message": "the model hit the output token limit"}
        return result
    if not response.tool_calls:
        result.status = "completed"
        return result
    calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in response.tool_calls]
    for call in calls:
        events.add("tool.call", call)
    needs_approval = [c for c in calls if (t := agent.tool_named(c["name"])) and t.requires_approval]
    if needs_approval:
        result.status = "requires_action"
        result.pending = {"reason": "approval", "tool_calls": calls,
                          "needs_approval": [c["id"] for c in needs_approval]}
        return result
    for call in calls:
        result.new_messages.append(_run_tool(agent, claim, context, call, events))
    if claim.step + 1 >= agent.max_steps:
        result.status, result.error = "incomplete", {"code": "max_steps",
                                                     "message": f"the agent used its {agent.max_steps} steps"}
    return result


def _answer_pending(agent: Agent, claim: Claim, context: dict[str, Any], events: "_StepEvents") -> list[dict[str, Any]]:
    """Turn the user's answer to a pause into the tool results the model will see."""
    resume, pending = context["resume"], context["pending"]
    outputs = {o["id"]: o.get("output") for o in resume.get("tool_outputs") or []}
    messages = []
    for call in pending.get("tool_calls", []):
        if call["id"] in outputs:
            output = outputs[call["id"]]
            message = {"role": "tool", "tool_call_id": call["id"], "name": call["name"],
                       "content": output if isinstance(output, str) else json.dumps(output)}
            events.add("tool.result", {"id": call["id"], "output": message["content"]})
            messages.append(message)
        elif call["id"] in pending.get("needs_approval", []) and not resume.get("approve"):
            content = "The user declined this action."
            events.add("tool.result", {"id": call["id"], "output": content, "declined": True})
            messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["name"], "content": content})
        else:
            messages.append(_run_tool(agent, claim, context, call, events))
    return messages


def _run_tool(agent: Agent, claim: Claim, context: dict[str, Any], call: dict[str, Any],
              events: "_StepEvents") -> dict[str, Any]:
    events.check()
    tool = agent.tool_named(call["name"])
    started = time.monotonic()
    try:
        if tool is None:
            raise LookupError(f"no tool named {call['name']!r}")
        ctx = ToolContext(
            tenant_id=context["tenant_id"], user_id=context["user_id"], session_id=context["session_id"],
            turn_id=claim.turn_id, idempotency_key=f"{claim.turn_id}:{claim.step}:{call['id']}",
        )
        value = tool.invoke(call["arguments"], ctx)
        output = value if isinstance(value, str) else json.dumps(value, default=str)
        error = None
    except Exception as exc:  # noqa: BLE001 - the model is told, and may recover
        output, error = f"error: {type(exc).__name__}: {exc}", True
    events.add("tool.result", {"id": call["id"], "output": output, "error": error,
                               "duration_ms": round((time.monotonic() - started) * 1000, 2)})
    events.check()
    return {"role": "tool", "tool_call_id": call["id"], "name": call["name"], "content": output}


def _commit(rt: Runtime, claim: Claim, result: StepResult, state: list[dict[str, Any]],
            events: "_StepEvents") -> str:
    """Write the step's outcome if this attempt still holds the turn; publish after commit."""
    events.flush()
    with unit_of_work(rt.sessions, claim) as db:
        # Session first, then turn: the same lock order as the API's cancel and create paths.
        session = db.scalars(select(AgentSession).where(AgentSession.id == claim.session_id)
                             .with_for_update()).first()
        fenced = db.execute(
            update(Turn).where(Turn.id == claim.turn_id, Turn.attempt == claim.attempt)
            .values(step_count=claim.step + 1, step_attempt=0, lease_owner=None, lease_expires_at=None)
            .execution_options(synchronize_session=False)
        )
        if session is None or fenced.rowcount == 0:
            return "zombie"  # another attempt owns the turn now (or it was deleted): commit nothing
        turn = db.get(Turn, claim.turn_id)
        assert turn is not None
        number = (db.scalar(select(func.max(Checkpoint.number)).where(Checkpoint.session_id == session.id)) or 0) + 1
        clean = [{k: v for k, v in m.items() if not k.startswith("_")} for m in result.new_messages]
        db.add(Checkpoint(session_id=session.id, tenant_id=turn.tenant_id, user_id=turn.user_id, number=number,
                          turn_id=turn.id, step=claim.step, state={"messages": state + clean}))
        for m in result.new_messages:
            db.add(Message(session_id=session.id, tenant_id=turn.tenant_id, user_id=turn.user_id, turn_id=turn.id,
                           step=claim.step, role=m["role"], content=m.get("content") or "",
                           tool_calls=m.get("tool_calls"), tool_call_id=m.get("tool_call_id"),
                           name=m.get("name"), status=m.get("_status", "complete")))
        turn.output = (turn.output or "") + result.text
        usage = dict(turn.usage or {})
        for key, value in result.usage.items():
            usage[key] = usage.get(key, 0) + value
        usage["steps"] = claim.step + 1
        turn.usage = usage
        turn.resume = None
        turn.pending = result.pending
        session.updated_at = utcnow()
        publish_after_commit(db, rt, session.id, [
            ("step.completed", turn.id, {"step": claim.step, "attempt": claim.step_attempt, "usage": result.usage})])
        if result.status == "in_progress" and turn.cancel_requested:
            result.status = "cancelled"
        if result.status == "in_progress":
            turn.enqueued_at = utcnow()
            next_step = claim.step + 1
            after_commit(db, lambda: rt.queue.enqueue_step(claim.turn_id, next_step))
        elif result.status == "requires_action":
            turn.status = "requires_action"
            publish_after_commit(db, rt, session.id, [("turn.requires_action", turn.id, result.pending)])
        else:
            finish_turn(db, rt, turn, session, result.status, result.error)
    return result.status


def _release(rt: Runtime, claim: Claim) -> None:
    with unit_of_work(rt.sessions, claim) as db:
        db.execute(update(Turn).where(Turn.id == claim.turn_id, Turn.attempt == claim.attempt)
                   .values(lease_owner=None, lease_expires_at=None, enqueued_at=utcnow())
                   .execution_options(synchronize_session=False))


class _StepEvents:
    """Events of a running step: deltas coalesced, flushed in batches of one round trip."""

    def __init__(self, rt: Runtime, claim: Claim):
        self.rt, self.claim = rt, claim
        self.interval = rt.settings.delta_flush_seconds
        self._pending: list[str] = []
        self._delta: list[str] = []
        self._lock = threading.Lock()
        self._last_flush = 0.0
        self.text = ""
        self.stop_reason: str | None = None

    def add(self, type_: str, data: dict[str, Any]) -> None:
        with self._lock:
            self._take_delta()
            self._pending.append(encode_event(type_, self.claim.turn_id, data))

    def delta(self, text: str) -> None:
        self.check()
        with self._lock:
            self._delta.append(text)
            self.text += text
            due = time.monotonic() - self._last_flush >= self.interval
        if due:
            self.flush()

    def _take_delta(self) -> None:
        if self._delta:
            self._pending.append(encode_event("message.delta", self.claim.turn_id,
                                              {"text": "".join(self._delta), "step": self.claim.step,
                                               "attempt": self.claim.step_attempt}))
            self._delta = []

    def flush(self) -> None:
        with self._lock:
            self._take_delta()
            bodies, self._pending = self._pending, []
            self._last_flush = time.monotonic()
        if bodies:
            _, cancelled = self.rt.events.append(self.claim.session_id, bodies, cancel_turn_id=self.claim.turn_id)
            if cancelled and self.stop_reason is None:
                self.stop_reason = "cancelled"

    def check(self) -> None:
        if self.stop_reason is not None:
            raise StepInterrupted(self.stop_reason)

    def pending_count(self) -> int:
        return len(self._pending) + len(self._delta)


class _StepWatch:
    """While a step runs: flush held deltas, extend the lease, notice a cancel."""

    def __init__(self, rt: Runtime, claim: Claim, events: _StepEvents):
        self.rt, self.claim, self.events = rt, claim, events
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{claim.turn_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        settings = self.rt.settings
        next_beat = time.monotonic() + settings.heartbeat_seconds
        next_cancel_check = time.monotonic() + 0.25
        while not self._done.wait(self.events.interval):
            try:
                if self.events.pending_count():
                    self.events.flush()
                now = time.monotonic()
                if now >= next_cancel_check:
                    next_cancel_check = now + 0.25
                    if self.rt.events.cancel_requested(self.claim.turn_id) and self.events.stop_reason is None:
                        self.events.stop_reason = "cancelled"
                if now >= next_beat:
                    next_beat = now + settings.heartbeat_seconds
                    self._heartbeat()
            except Exception:  # noqa: BLE001 - a failed beat is retried; the lease covers several
                log.warning("turn %s: step watch failed", self.claim.turn_id, exc_info=True)

    def _heartbeat(self) -> None:
        with unit_of_work(self.rt.sessions, self.claim) as db:
            row = db.execute(
                update(Turn).where(Turn.id == self.claim.turn_id, Turn.attempt == self.claim.attempt)
                .values(lease_expires_at=utcnow() + timedelta(seconds=self.rt.settings.lease_seconds))
                .returning(Turn.cancel_requested)
                .execution_options(synchronize_session=False)
            ).first()
        if row is None:
            self.events.stop_reason = "lease_lost"
        elif row.cancel_requested and self.events.stop_reason is None:
            self.events.stop_reason = "cancelled"
