"""One reasoning step of one turn: claim, load, run, commit, publish, continue.

This is the coordinator every worker (Celery or the embedded thread pool) runs;
the parts live beside it, each importing only the ones before it:

- :mod:`~shared.engine.outcome` — results, stop reasons, the history's message shape;
- :mod:`~shared.engine.claim` — the fenced lease, and the step's input read with it;
- :mod:`~shared.engine.trace` — the step's spans, written with its commit;
- :mod:`~shared.engine.buffer` — the step's events, flushed in batches;
- :mod:`~shared.engine.watch` — heartbeat, cancel, time limits, shutdown;
- :mod:`~shared.engine.journal` — the model's response and each tool call, recorded as they happen;
- :mod:`~shared.engine.tools` — tool calls (through the journal) and answers to a pause;
- :mod:`~shared.engine.commit` — the fenced commit.

Duplicates are harmless and crashes lose nothing: a task that claims nothing
exits quietly; no database connection is held across the model call; a zombie
attempt commits nothing; the scheduler re-sends what a crash left behind.

Side effects happen once: the model's response is recorded before its tools run
(one without tools, with the step's commit) and a retried attempt reuses it (the
same tool calls, so the same idempotency keys); each tool call is journaled
before it runs and its result as it returns (shared/engine/tools.py). Budgets
are checked before each model call (with the claim, when it goes straight to it).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from shared.agent import Agent, AgentRegistry
from shared.clock import aware, utcnow
from shared.engine.buffer import StepEvents
from shared.engine.claim import Claim, StepInput, claim_and_load
from shared.engine.commit import commit_step, release_step
from shared.engine.journal import (
    StepJournal,
    load_journal,
    start_model_call,
    start_model_call_with_claim,
)
from shared.engine.outcome import (
    ChatMessage,
    StepInterrupted,
    StepOutcome,
    StepResult,
    StopReason,
    close_tool_calls,
    for_model,
    stopped_outcome,
)
from shared.engine.tools import ToolOutcomeUnknown, answer_pending, pending_call_step, run_tools
from shared.engine.watch import StepWatch, step_deadline
from shared.llm import ModelError, ModelResponse, TransientModelError, build_model
from shared.logs import log_context
from shared.metrics import BUDGET_STOPS, MODEL_REPLAYS, TOOL_JOURNAL
from shared.models import TurnStatus
from shared.runtime import Runtime
from shared.settings import Settings
from shared.turns import fairshare
from shared.turns.budgets import BudgetExceeded
from shared.turns.events import system_work_marking_published

log = logging.getLogger(__name__)


def run_step_in_process(rt: Runtime, turn_id: str, step: int) -> None:
    """The embedded queue's runner (``Runtime.create(step_runner=...)``)."""
    # A pool thread lives on after the step: scope the step's log ids to it.
    with log_context(turn_id=turn_id, step=step):
        run_step(rt, turn_id, step)


def run_step(rt: Runtime, turn_id: str, step: int) -> TurnStatus | StepOutcome:
    """Run step ``step`` of ``turn_id`` if it is still due. Returns what happened, for logs and tests."""
    if rt.stopping.is_set():
        # This worker is shutting down (and Celery's gevent pool keeps taking deliveries while
        # it waits for running tasks): leave the step to a worker that stays, claiming nothing.
        time.sleep(0.2)  # not a busy loop if this very worker receives the message again
        rt.queue.enqueue_step(turn_id, step)
        return StepOutcome.PASSED_ON
    claimed_at = time.monotonic()  # the lease runs from (no earlier than) here
    deferred, claim, loaded, call_started = claim_step(rt, turn_id, step)
    if deferred:
        return StepOutcome.DEFERRED  # its user or tenant is at its running cap: sent again when a slot frees
    if claim is None:
        return StepOutcome.SKIPPED
    # The connection is back in the pool before the model is called.
    if loaded is None:
        return StepOutcome.ZOMBIE  # deleted under us: nothing to commit to
    state = list(loaded.history)
    agent = rt.agents.get(loaded.agent_name)
    events = StepEvents(rt, claim, claimed_at=claimed_at, floor=loaded.event_cursor)
    last_failure = loaded.retry_reason or "the previous attempt did not finish"
    if claim.step_failures >= rt.settings.max_attempts:
        # Only attempts that died or failed count: not hand-backs (a worker shutting down), nor deliveries
        # that claimed nothing.
        reason = (f"step {step} failed {claim.step_failures} times (STEPRUN_MAX_ATTEMPTS="
                  f"{rt.settings.max_attempts}); the last attempt: {last_failure}")
        return commit_step(rt, claim, StepResult(status=TurnStatus.FAILED,
                                                 error={"code": "max_attempts", "message": reason}), state, events)
    if claim.step_attempt > 1:
        # Clients drop what earlier attempts of this step streamed (deltas carry step and attempt).
        events.add("step.retrying", {"step": step, "attempt": claim.step_attempt, "reason": last_failure})
    elif step == 0:
        events.add("turn.started", {})
    events.add("step.started", {"step": step, "attempt": claim.step_attempt})
    if agent is None:
        error = {"code": "unknown_agent", "message": f"agent {loaded.agent_name!r} is not served here"}
        return commit_step(rt, claim, StepResult(status=TurnStatus.FAILED, error=error), state, events)
    if loaded.cancel:
        return commit_step(rt, claim, StepResult(status=TurnStatus.CANCELLED), state, events)
    deadline, deadline_reason = step_deadline(rt, loaded.deadline_at)
    if deadline_reason == StopReason.TURN_TIME_LIMIT and deadline is not None and deadline <= time.monotonic():
        stopped = stopped_outcome(StepResult(), StopReason.TURN_TIME_LIMIT, rt.settings, step, events.text, state)
        return commit_step(rt, claim, stopped, state, events)

    watch = StepWatch(rt, claim, events, deadline=deadline, deadline_reason=deadline_reason)
    watch.start()
    result = StepResult()
    try:
        with watch.interruptible():
            _execute(rt, agent, claim, loaded, state, events, result, call_started=call_started)
    except StepInterrupted as stop:
        watch.stop()
        if stop.reason == StopReason.LEASE_LOST:
            log.warning("turn %s step %s: lease lost, attempt %s abandoned", turn_id, step, claim.attempt)
            return StepOutcome.ZOMBIE
        if stop.reason == StopReason.SHUTDOWN:
            # Hand the step back instead of being killed mid-way: another worker resumes it
            # from the same checkpoint now, not after the lease runs out.
            release_step(rt, claim, "the worker running it shut down", failed=False)
            rt.queue.enqueue_step(turn_id, step)
            return StepOutcome.HANDED_BACK
        stopped_outcome(result, stop.reason, rt.settings, step, events.text, state)
    except TransientModelError as exc:
        # Hand the step back: the next attempt starts from the same checkpoint.
        watch.stop()
        release_step(rt, claim, f"the model provider failed: {exc}"[:500], failed=True)
        log.warning("turn %s step %s: transient model error, retrying: %s", turn_id, step, exc)
        rt.queue.enqueue_step(turn_id, step)
        return StepOutcome.RELEASED
    except ModelError as exc:
        result.status, result.error = TurnStatus.FAILED, {"code": "model_error", "message": str(exc)[:2000]}
        close_tool_calls(state, result.new_messages, "not run: the turn failed")
    except Exception as exc:  # noqa: BLE001 - an agent's own bug fails its turn, not the worker
        log.exception("turn %s step %s raised", turn_id, step)
        result.status, result.error = TurnStatus.FAILED, {"code": "agent_error",
                                                          "message": f"{type(exc).__name__}: {exc}"[:2000]}
        close_tool_calls(state, result.new_messages, "not run: the turn failed")
    except BaseException:
        watch.stop()  # the pool is killing this greenlet: stop beating, so the lease can lapse
        raise
    try:
        # The heartbeat goes on through the commit: a slow flush (Redis away) or a database
        # restart here must not let the lease lapse and hand a finished step to another worker.
        return commit_step(rt, claim, result, state, events)
    finally:
        watch.stop()


def claim_step(rt: Runtime, turn_id: str, step: int) -> tuple[bool, Claim | None, StepInput | None, bool]:
    """The claim's transaction: (deferred by the fair share, the claim, the step's input, the model call started).

    The claim looks a turn up by id alone: the one cross-tenant read of a step. The claim and the step's
    input in one transaction (one round of BEGIN/COMMIT): the input is read by the ids the claim returned,
    so the system scope reads nothing the turn's owner cannot.
    """
    # The events this process published and has not marked yet are marked in this transaction, ahead of it.
    with system_work_marking_published(rt) as db:
        # A turn's first claim takes its owner's fair-share lock ahead of it, in its round trip, and claims
        # only under the caps; one that claims nothing asks whether a cap was why (then the turn waits).
        first = fairshare.first_claim(db, rt.settings, turn_id, step)
        claim, loaded = claim_and_load(db, turn_id, step, rt.worker_id, rt.settings.lease_seconds,
                                       rt.settings.turn_time_limit, rt.history_cache, first)
        if claim is None and first is not None:
            over = fairshare.defer_over_cap(db, rt.settings, turn_id)
            if over:
                return True, None, None, False
            if over is False:  # it fits now: a running turn of its owner ended after the claim's snapshot
                claim, loaded = claim_and_load(db, turn_id, step, rt.worker_id, rt.settings.lease_seconds,
                                               rt.settings.turn_time_limit, rt.history_cache)
        # The step's model call, started (its budgets checked) with the claim when the step goes straight
        # to it: one transaction fewer per step (shared/engine/journal.py).
        call_started = (claim is not None and loaded is not None and _calls_the_model_first(rt, claim, loaded)
                        and start_model_call_with_claim(db, rt, claim))
    return False, claim, loaded, call_started


def _calls_the_model_first(rt: Runtime, claim: Claim, loaded: StepInput) -> bool:
    """True if the step's first act is its model call: a first attempt (nothing recorded), not resuming a
    pause (its tools run first), and none of the ends :func:`run_step` checks before it calls the model."""
    return (claim.step_attempt == 1 and not loaded.resume and not loaded.cancel
            and claim.step_failures < rt.settings.max_attempts and rt.agents.get(loaded.agent_name) is not None
            and (loaded.deadline_at is None or aware(loaded.deadline_at) > utcnow()))


def _execute(rt: Runtime, agent: Agent, claim: Claim, loaded: StepInput, state: list[ChatMessage],
             events: StepEvents, result: StepResult, *, call_started: bool = False) -> StepResult:
    """Run the step into ``result``, which keeps what was done if the step is interrupted."""
    resuming = bool(loaded.resume and loaded.pending)
    call_step = pending_call_step(claim, loaded.pending or {}) if resuming else claim.step
    journal = load_journal(rt, claim, (claim.step, call_step))
    journal.model_call_started = call_started
    try:
        return _run(rt, agent, claim, loaded, state, events, result, journal)
    except ToolOutcomeUnknown as unknown:
        return _outcome_unknown(rt, claim, unknown, state, events, result)
    except BudgetExceeded as over:
        BUDGET_STOPS.labels(budget=over.budget).inc()
        events.add("budget.exceeded", over.as_error())
        result.status, result.error = TurnStatus.INCOMPLETE, over.as_error()
        close_tool_calls(state, result.new_messages, f"not run: {over.message}")
        return result
    finally:
        # However the step ends, an answer no tool call's start recorded is recorded by its commit.
        result.unrecorded_response = journal.unrecorded_response
        result.response_maybe_recorded = journal.response_maybe_recorded


def _run(rt: Runtime, agent: Agent, claim: Claim, loaded: StepInput, state: list[ChatMessage],
         events: StepEvents, result: StepResult, journal: StepJournal) -> StepResult:
    if claim.step == 0 and not loaded.resume:
        result.new_messages.append({"role": "user", "content": loaded.input})
    if loaded.resume and loaded.pending:
        result.new_messages.extend(answer_pending(agent, claim, loaded, events, journal))
    closing: list[ChatMessage] = []
    if claim.step == 0 and not loaded.resume:
        # A turn that ended while paused (expired, cancelled) left its tool calls unanswered, which
        # chat APIs reject: the prompt answers them; the stored history stays as it happened.
        close_tool_calls(state, closing, "not run: the turn ended before the user answered")
    # The model gets its own copies: the history's dicts are shared with this process's history cache.
    messages = [m.copy() for m in state] + closing + [for_model(m) for m in result.new_messages]
    response = _model_response(rt, agent, claim, messages, events, journal, result)
    if response.tool_calls:
        # The text before the calls goes out now: the tools may take a while. Without calls, the last
        # deltas go with the commit's append (StepEvents.hand_to_commit).
        events.flush(when_due=True)
    result.text = response.text
    result.usage = {"input_tokens": response.usage.input_tokens, "output_tokens": response.usage.output_tokens}
    assistant: ChatMessage = {"role": "assistant", "content": response.text}
    if response.tool_calls:
        assistant["tool_calls"] = [c.as_message_part() for c in response.tool_calls]
    result.new_messages.append(assistant)
    if response.finish_reason == "length":
        result.status, result.error = TurnStatus.INCOMPLETE, {"code": "max_output_tokens",
                                                              "message": "the model hit the output token limit"}
        return result
    if not response.tool_calls:
        result.status = TurnStatus.COMPLETED
        return result
    calls: list[dict[str, Any]] = [{"id": c.id, "name": c.name, "arguments": c.arguments}
                                   for c in response.tool_calls]
    for call in calls:
        events.add("tool.call", call)
    needs_approval = [c for c in calls if (t := agent.tool_named(c["name"])) and t.requires_approval]
    questions = [c for c in calls if (t := agent.tool_named(c["name"])) and t.asks_user]
    if needs_approval or questions:
        # Pause: nothing is held while the user thinks; resume runs the calls (or not) on any worker.
        result.status = TurnStatus.REQUIRES_ACTION
        result.pending = {"reason": "approval" if needs_approval else "question", "tool_calls": calls,
                          "call_step": claim.step,
                          "needs_approval": [c["id"] for c in needs_approval],
                          "questions": [{"id": c["id"], "question": str(c["arguments"].get("question", ""))}
                                        for c in questions]}
        return result
    result.new_messages.extend(run_tools(agent, claim, loaded, calls, events, journal, call_step=claim.step))
    if claim.step + 1 >= agent.max_steps:
        result.status, result.error = TurnStatus.INCOMPLETE, {
            "code": "max_steps", "message": f"the agent used its {agent.max_steps} steps"}
    return result


def _model_response(rt: Runtime, agent: Agent, claim: Claim, messages: list[ChatMessage], events: StepEvents,
                    journal: StepJournal, result: StepResult) -> ModelResponse:
    """The model's answer for this step: the one an earlier attempt recorded, or a new call, recorded with its
    first tool call's start (shared/engine/tools.py) or else with the step's commit (``unrecorded_response``)."""
    if journal.response is not None:
        # Not called again: a new call would invent new tool call ids (new idempotency keys) or other calls.
        response = journal.response
        MODEL_REPLAYS.inc()
        events.add("model.replayed", {"step": claim.step, "attempt": claim.step_attempt,
                                      "recorded_attempt": journal.response_attempt})
        events.trace.model_replayed(response, journal.response_attempt)
        if response.text:
            events.delta(response.text)  # clients dropped the dead attempt's deltas at step.retrying
        return response
    if not journal.model_call_started:  # else done with the claim, budgets checked
        start_model_call(rt, claim, events.check)  # budgets first: over budget, no call is made
    model = build_model(agent.model, rt.settings)
    system: list[ChatMessage] = [{"role": "system", "content": agent.instructions}] if agent.instructions else []
    events.trace.model_started(model)
    response = model.generate(
        system + messages, [t.schema() for t in agent.tools], events.delta, max_output_tokens=agent.max_output_tokens
    )
    events.trace.model_finished(response)
    # Recorded before any of its tools runs, in the transaction that starts the first (from then on every
    # attempt of this step sees these very tool calls), or by the step's commit if no tool runs. A retry after
    # a crash before either calls the model again, as one after a crash during the call does: nothing ran.
    journal.unrecorded_response = response
    return response


def _outcome_unknown(rt: Runtime, claim: Claim, unknown: ToolOutcomeUnknown, state: list[ChatMessage],
                     events: StepEvents, result: StepResult) -> StepResult:
    """A non-idempotent call's outcome is unknown: ask (requires_action) or fail, per the setting."""
    call = unknown.call
    policy = rt.settings.tool_outcome_unknown
    result.new_messages.extend(unknown.answered)
    events.add("tool.outcome_unknown", {"id": call["id"], "name": call["name"], "policy": policy,
                                        "started_at": unknown.started_at})
    events.trace.tool_finished(call, "", None, time.monotonic(), journal="unknown", status="unknown")
    TOOL_JOURNAL.labels(outcome=f"unknown_{'paused' if policy == 'pause' else 'failed'}").inc()
    detail = (f"tool call {call['id']} ({call['name']}) was started by an attempt that died before its result "
              "was recorded: it may or may not have taken effect")
    if policy == "fail":
        result.status, result.error = TurnStatus.FAILED, {"code": "tool_outcome_unknown", "message": detail,
                                                          "tool_call": call}
        close_tool_calls(state, result.new_messages, "not run: the turn failed (a tool's outcome is unknown)")
        return result
    result.status = TurnStatus.REQUIRES_ACTION
    result.pending = {"reason": "tool_outcome_unknown", "tool_calls": unknown.remaining,
                      "call_step": claim.step if unknown.call_step is None else unknown.call_step,
                      "unknown": [{**call, "started_at": unknown.started_at, "attempt": unknown.attempt,
                                   "message": detail}],
                      "needs_approval": [], "questions": []}
    return result


def build_runtime(settings: Settings, *, agents: AgentRegistry | None = None, dev: bool = False) -> Runtime:
    """The runtime for a process's entrypoint, with this engine as its in-process step runner.

    Production processes send steps through Celery and never call the runner; the
    embedded mode (no Redis) runs them on its in-process queue.
    """
    return Runtime.create(settings, agents=agents, step_runner=run_step_in_process, dev=dev)
