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
   (shared/step_watch.py) extends the lease, flushes deltas, notices a cancel
   request, and enforces the step and turn time limits and worker shutdown.
4. :func:`_commit` writes checkpoint, messages and turn progress in one
   transaction that first checks the fencing number, so a zombie attempt (its
   lease expired and another took over) commits nothing.
5. After the commit, events are published and the next step enqueued. A crash
   between the two is covered by the scheduler: the commit stamped
   ``enqueued_at`` with no lease, which is what the lost-task sweep looks for.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from shared.agent import Agent, ToolContext
from shared.conversations import finish_turn, publish_after_commit
from shared.db import SYSTEM, database_unavailable, unit_of_work
from shared.llm import ModelError, ModelResponse, TransientModelError, build_model
from shared.models import AgentSession, Checkpoint, Message, Turn, utcnow
from shared.runtime import Runtime, after_commit
from shared.step_watch import (
    LEASE_LOST,
    SHUTDOWN,
    TURN_TIME_LIMIT,
    StepEvents,
    StepInterrupted,
    StepWatch,
    aware,
    close_tool_calls,
    step_deadline,
    stopped_outcome,
)
from shared.storage_context import tool_storage

log = logging.getLogger(__name__)
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


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
    if rt.stopping.is_set():
        # This worker is shutting down (and Celery's gevent pool keeps taking deliveries while
        # it waits for running tasks): leave the step to a worker that stays, claiming nothing.
        time.sleep(0.2)  # not a busy loop if this very worker receives the message again
        rt.queue.enqueue_step(turn_id, step)
        return "passed on"
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
        if turn.deadline_at is None and rt.settings.turn_time_limit > 0 and turn.started_at is not None:
            # Set once, from the first claim; resuming a pause pushes it back by the time paused.
            turn.deadline_at = aware(turn.started_at) + timedelta(seconds=rt.settings.turn_time_limit)
        context = dict(
            tenant_id=turn.tenant_id, user_id=turn.user_id, session_id=session.id, agent_name=session.agent,
            input=turn.input, resume=turn.resume, pending=turn.pending, cancel=turn.cancel_requested,
            deadline_at=turn.deadline_at, retry_reason=turn.retry_reason,
        )
    # The connection is back in the pool before the model is called.
    agent = rt.agents.get(context["agent_name"])
    events = StepEvents(rt, claim)
    last_failure = context["retry_reason"] or "the previous attempt did not finish"
    if claim.step_attempt > rt.settings.max_attempts:
        reason = (f"step {step} failed {claim.step_attempt - 1} times (STEPRUN_MAX_ATTEMPTS="
                  f"{rt.settings.max_attempts}); the last attempt: {last_failure}")
        return _commit(rt, claim, StepResult(status="failed", error={"code": "max_attempts", "message": reason}),
                       state, events)
    if claim.step_attempt > 1:
        # Clients drop what earlier attempts of this step streamed (deltas carry step and attempt).
        events.add("step.retrying", {"step": step, "attempt": claim.step_attempt, "reason": last_failure})
    elif step == 0:
        events.add("turn.started", {})
    events.add("step.started", {"step": step, "attempt": claim.step_attempt})
    if agent is None:
        error = {"code": "unknown_agent", "message": f"agent {context['agent_name']!r} is not served here"}
        return _commit(rt, claim, StepResult(status="failed", error=error), state, events)
    if context["cancel"]:
        return _commit(rt, claim, StepResult(status="cancelled"), state, events)
    deadline, deadline_reason = step_deadline(rt, context["deadline_at"])
    if deadline_reason == TURN_TIME_LIMIT and deadline is not None and deadline <= time.monotonic():
        return _commit(rt, claim, stopped_outcome(StepResult(), TURN_TIME_LIMIT, rt, events, state), state, events)

    watch = StepWatch(rt, claim, events, deadline=deadline, deadline_reason=deadline_reason)
    watch.start()
    result = StepResult()
    try:
        with watch.interruptible():
            _execute(rt, agent, claim, context, state, events, result)
    except StepInterrupted as stop:
        watch.stop()
        if stop.reason == LEASE_LOST:
            log.warning("turn %s step %s: lease lost, attempt %s abandoned", turn_id, step, claim.attempt)
            return "zombie"
        if stop.reason == SHUTDOWN:
            # Hand the step back instead of being killed mid-way: another worker resumes it
            # from the same checkpoint now, not after the lease runs out.
            _release(rt, claim, "the worker running it shut down")
            rt.queue.enqueue_step(turn_id, step)
            return "handed back"
        stopped_outcome(result, stop.reason, rt, events, state)
    except TransientModelError as exc:
        # Hand the step back: the next attempt starts from the same checkpoint.
        watch.stop()
        _release(rt, claim, f"the model provider failed: {exc}"[:500])
        log.warning("turn %s step %s: transient model error, retrying: %s", turn_id, step, exc)
        rt.queue.enqueue_step(turn_id, step)
        return "released"
    except ModelError as exc:
        result.status, result.error = "failed", {"code": "model_error", "message": str(exc)[:2000]}
        close_tool_calls(state, result.new_messages, "not run: the turn failed")
    except Exception as exc:  # noqa: BLE001 - an agent's own bug fails its turn, not the worker
        log.exception("turn %s step %s raised", turn_id, step)
        result.status, result.error = "failed", {"code": "agent_error",
                                                 "message": f"{type(exc).__name__}: {exc}"[:2000]}
        close_tool_calls(state, result.new_messages, "not run: the turn failed")
    except BaseException:
        watch.stop()  # the pool is killing this greenlet: stop beating, so the lease can lapse
        raise
    try:
        # The heartbeat goes on through the commit: a slow flush (Redis away) or a database
        # restart here must not let the lease lapse and hand a finished step to another worker.
        return _commit(rt, claim, result, state, events)
    finally:
        watch.stop()


def _execute(rt: Runtime, agent: Agent, claim: Claim, context: dict[str, Any], state: list[dict[str, Any]],
             events: StepEvents, result: StepResult) -> StepResult:
    """Run the step into ``result``, which keeps what was done if the step is interrupted."""
    if claim.step == 0 and not context["resume"]:
        result.new_messages.append({"role": "user", "content": context["input"]})
    if context["resume"] and context["pending"]:
        result.new_messages.extend(_answer_pending(agent, claim, context, events))
    closing: list[dict[str, Any]] = []
    if claim.step == 0 and not context["resume"]:
        # A turn that ended while paused (expired, cancelled) left its tool calls unanswered, which
        # chat APIs reject: the prompt answers them; the stored history stays as it happened.
        close_tool_calls(state, closing, "not run: the turn ended before the user answered")
    messages = state + closing + [{k: v for k, v in m.items() if not k.startswith("_")} for m in result.new_messages]
    model = build_model(agent.model, rt.settings)
    prompt = ([{"role": "system", "content": agent.instructions}] if agent.instructions else []) + messages
    events.trace.model_started(model)
    response: ModelResponse = model.generate(
        prompt, [t.schema() for t in agent.tools], events.delta, max_output_tokens=agent.max_output_tokens
    )
    events.trace.model_finished(response)
    events.flush(when_due=True)
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
    questions = [c for c in calls if (t := agent.tool_named(c["name"])) and t.asks_user]
    if needs_approval or questions:
        # Pause: nothing is held while the user thinks; resume runs the calls (or not) on any worker.
        result.status = "requires_action"
        result.pending = {"reason": "approval" if needs_approval else "question", "tool_calls": calls,
                          "needs_approval": [c["id"] for c in needs_approval],
                          "questions": [{"id": c["id"], "question": str(c["arguments"].get("question", ""))}
                                        for c in questions]}
        return result
    for call in calls:
        result.new_messages.append(_run_tool(agent, claim, context, call, events))
    if claim.step + 1 >= agent.max_steps:
        result.status, result.error = "incomplete", {"code": "max_steps",
                                                     "message": f"the agent used its {agent.max_steps} steps"}
    return result


def _answer_pending(agent: Agent, claim: Claim, context: dict[str, Any], events: StepEvents) -> list[dict[str, Any]]:
    """Turn the user's answer to a pause into the tool results the model will see."""
    resume, pending = context["resume"], context["pending"]
    outputs = {o["id"]: o.get("output") for o in resume.get("tool_outputs") or []}
    questions = {q["id"] for q in pending.get("questions") or []}
    messages = []
    for call in pending.get("tool_calls", []):
        if call["id"] in outputs:
            output = outputs[call["id"]]
            message = {"role": "tool", "tool_call_id": call["id"], "name": call["name"],
                       "content": output if isinstance(output, str) else json.dumps(output)}
            events.add("tool.result", {"id": call["id"], "output": message["content"]})
            messages.append(message)
        elif call["id"] in questions:
            answer = resume.get("input") or ""
            events.add("tool.result", {"id": call["id"], "output": answer})
            messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["name"], "content": answer})
        elif call["id"] in pending.get("needs_approval", []) and not resume.get("approve"):
            content = "The user declined this action."
            events.add("tool.result", {"id": call["id"], "output": content, "declined": True})
            messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["name"], "content": content})
        else:
            messages.append(_run_tool(agent, claim, context, call, events))
    return messages


def _run_tool(agent: Agent, claim: Claim, context: dict[str, Any], call: dict[str, Any],
              events: StepEvents) -> dict[str, Any]:
    events.check()
    tool = agent.tool_named(call["name"])
    started = time.monotonic()
    events.in_tool = True
    try:
        if tool is None:
            raise LookupError(f"no tool named {call['name']!r}")
        ctx = ToolContext(
            tenant_id=context["tenant_id"], user_id=context["user_id"], session_id=context["session_id"],
            turn_id=claim.turn_id, idempotency_key=f"{claim.turn_id}:{claim.step}:{call['id']}",
            **tool_storage(events.rt, claim),
        )
        value = tool.invoke(call["arguments"], ctx)
        output = value if isinstance(value, str) else json.dumps(value, default=str)
        error = None
    except Exception as exc:  # noqa: BLE001 - the model is told, and may recover
        output, error = f"error: {type(exc).__name__}: {exc}", True
    finally:
        events.in_tool = False
    events.trace.tool_finished(call, output, error, started)
    events.add("tool.result", {"id": call["id"], "output": output, "error": error,
                               "duration_ms": round((time.monotonic() - started) * 1000, 2)})
    events.check()
    return {"role": "tool", "tool_call_id": call["id"], "name": call["name"], "content": output}


# Pauses between commit attempts while the database is unreachable (about half a minute in all).
COMMIT_RETRY_DELAYS = (0.25, 0.5, 1.0) + (2.0,) * 14


def _commit(rt: Runtime, claim: Claim, result: StepResult, state: list[dict[str, Any]],
            events: StepEvents) -> str:
    """Write the step's outcome if this attempt still holds the turn, riding out a database restart.

    The work of the step is in memory only: losing it to a short outage would cost
    a whole new model call. Repeating the commit is safe because the fence also
    checks the step number: a commit that reached the database just before the
    connection dropped turns the repeat into a no-op.
    """
    events.flush()
    for delay in COMMIT_RETRY_DELAYS:
        try:
            return _commit_once(rt, claim, result, state, events)
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            log.warning("turn %s step %s: database unavailable at commit, retrying in %ss: %s",
                        claim.turn_id, claim.step, delay, exc)
            time.sleep(delay)
    return _commit_once(rt, claim, result, state, events)


def _commit_once(rt: Runtime, claim: Claim, result: StepResult, state: list[dict[str, Any]],
                 events: StepEvents) -> str:
    with unit_of_work(rt.sessions, claim) as db:
        # Session first, then turn: the same lock order as the API's cancel and create paths.
        session = db.scalars(select(AgentSession).where(AgentSession.id == claim.session_id)
                             .with_for_update()).first()
        fenced = db.execute(
            update(Turn).where(Turn.id == claim.turn_id, Turn.attempt == claim.attempt, Turn.step_count == claim.step)
            .values(step_count=claim.step + 1, step_attempt=0, lease_owner=None, lease_expires_at=None,
                    retry_reason=None)
            .execution_options(synchronize_session=False)
        )
        if session is None or fenced.rowcount == 0:
            return "zombie"  # another attempt owns the turn now (or it was deleted): commit nothing
        turn = db.get(Turn, claim.turn_id)
        assert turn is not None
        events.trace.write(db, turn, result)  # the spans commit (or not) with the step
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
            now = utcnow()
            expires = now + timedelta(seconds=rt.settings.action_timeout_seconds)
            pending = {**(result.pending or {}), "expires_at": expires.isoformat().replace("+00:00", "Z")}
            # The scheduler expires the pause at action_expires_at (shared/lifecycle.py).
            turn.status, turn.pending, turn.paused_at, turn.action_expires_at = "requires_action", pending, now, expires
            publish_after_commit(db, rt, session.id, [("turn.requires_action", turn.id, {
                "reason": pending.get("reason"), "pending": pending, "expires_at": pending["expires_at"]})])
        else:
            finish_turn(db, rt, turn, session, result.status, result.error)
    return result.status


def _release(rt: Runtime, claim: Claim, reason: str) -> None:
    """Give the lease back so the next attempt may start now; ``reason`` is shown in its step.retrying."""
    with unit_of_work(rt.sessions, claim) as db:
        db.execute(update(Turn).where(Turn.id == claim.turn_id, Turn.attempt == claim.attempt)
                   .values(lease_owner=None, lease_expires_at=None, enqueued_at=utcnow(), retry_reason=reason)
                   .execution_options(synchronize_session=False))

