"""Agents for the tool-journal and budget tests (STEPRUN_AGENTS=tests.support.agents_journal).

The model invents fresh tool call ids and nonces on every call, as a real model
does: if a retried step called it again, the same side effect would arrive with a
new id and a new idempotency key. ``charge`` is not idempotent; ``reserve`` is.
Each execution is recorded: in the ``chaos_effects`` table when CHAOS_DATABASE_URL
is set (the chaos test's worker processes), else in :data:`EFFECTS`.

Chaos (worker processes only, CHAOS_DATABASE_URL set): with probabilities from
CHAOS_KILL_AFTER_EFFECT / CHAOS_KILL_AFTER_RECORD / CHAOS_KILL_AFTER_MODEL, the
worker SIGKILLs itself right after a tool's side effect (before its result is
recorded), right after the result is recorded (before the step commits), or right
after the model's response is recorded (before its tools run). Each kill is
written to ``chaos_kills`` first. CHAOS_MAX_KILLS_PER_CALL bounds kills per call.
"""
from __future__ import annotations

import os
import random
import secrets
import signal
import threading
from typing import Any

from shared.agent import Agent, ToolContext, tool
from shared.llm.base import ToolCallRequest
from shared.llm.scripted import Reply, ScriptedModel

EFFECTS: list[dict[str, Any]] = []
_lock = threading.Lock()
DB_URL = os.environ.get("CHAOS_DATABASE_URL")


def _db() -> Any:
    import psycopg2

    return psycopg2.connect(DB_URL)


def _record(table: str, **row: Any) -> None:
    if DB_URL is None:
        with _lock:
            EFFECTS.append(row)
        return
    conn = _db()
    try:
        with conn, conn.cursor() as cur:
            cols = ", ".join(row)
            cur.execute(f"INSERT INTO {table} ({cols}) VALUES ({', '.join(['%s'] * len(row))})", list(row.values()))
    finally:
        conn.close()


def _kills(turn_id: str, call_id: str) -> int:
    conn = _db()
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM chaos_kills WHERE turn_id = %s AND call_id = %s", (turn_id, call_id))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def maybe_die(moment: str, turn_id: str, call_id: str, tool_name: str) -> None:
    """SIGKILL this worker at ``moment`` with the configured probability (chaos runs only)."""
    if DB_URL is None:
        return
    rate = float(os.environ.get(f"CHAOS_KILL_{moment.upper()}", "0"))
    if rate <= 0 or random.random() >= rate:
        return
    if _kills(turn_id, call_id) >= int(os.environ.get("CHAOS_MAX_KILLS_PER_CALL", "2")):
        return
    _record("chaos_kills", turn_id=turn_id, call_id=call_id, tool=tool_name, moment=moment, pid=os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


def _effect(tool_name: str, ctx: ToolContext, nonce: str) -> None:
    _, step, call_id = ctx.idempotency_key.split(":", 2)  # turn:step:call-id
    _record("chaos_effects", tool=tool_name, turn_id=ctx.turn_id, step=int(step), call_id=call_id,
            idempotency_key=ctx.idempotency_key, nonce=nonce)
    maybe_die("after_effect", ctx.turn_id, call_id, tool_name)


@tool
def charge(amount: int, nonce: str, ctx: ToolContext) -> str:
    """Charge the user's card (not idempotent: every execution charges)."""
    _effect("charge", ctx, nonce)
    return f"charged {amount}"


@tool(idempotent=True)
def reserve(item: str, nonce: str, ctx: ToolContext) -> str:
    """Reserve an item; the provider dedupes on the idempotency key."""
    _effect("reserve", ctx, nonce)
    return f"reserved {item}"


class Inventive(ScriptedModel):
    """Calls charge and reserve with ids and nonces it makes up on every call, for ``rounds`` steps, then answers."""

    def __init__(self, *, rounds: int = 2, **options: Any):
        super().__init__(**options)
        self.rounds = rounds
        self.calls = 0  # model calls made in this process

    def default_script(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Reply:
        with _lock:
            self.calls += 1
        done = sum(1 for m in messages if m.get("role") == "assistant")
        if done >= self.rounds:
            return Reply(text=f"Done after {done} rounds: " + "; ".join(
                str(m.get("content")) for m in messages if m.get("role") == "tool"))
        nonce = secrets.token_hex(6)
        return Reply(text=f"Round {done + 1}. ", tool_calls=[
            ToolCallRequest(id=f"call_{secrets.token_hex(8)}", name="charge",
                            arguments={"amount": done + 1, "nonce": f"{done}-{nonce}"}),
            ToolCallRequest(id=f"call_{secrets.token_hex(8)}", name="reserve",
                            arguments={"item": f"seat {done + 1}", "nonce": f"{done}-{nonce}"}),
        ])


class Spender(ScriptedModel):
    """Every call costs exactly ``cost`` tokens and asks for one more tool call: only a budget ends the turn."""

    def __init__(self, *, cost: int = 10, **options: Any):
        super().__init__(**options)
        self.cost = cost
        self.calls = 0

    def generate(self, messages: Any, tools: Any, on_delta: Any, *, max_output_tokens: int | None = None) -> Any:
        from shared.llm.base import ModelResponse, Usage

        if self.ttft:
            import time

            time.sleep(self.ttft)
        with _lock:
            self.calls += 1
        on_delta("spending. ")
        return ModelResponse(text="spending. ", tool_calls=[ToolCallRequest(
            id=f"call_{secrets.token_hex(8)}", name="noop", arguments={})],
            usage=Usage(input_tokens=self.cost - 2, output_tokens=2), finish_reason="tool_calls")


@tool(idempotent=True)
def noop() -> str:
    """Do nothing."""
    return "ok"


INVENTIVE = Inventive(rounds=2)
SPENDER = Spender(cost=10)
SLOW_SPENDER = Spender(cost=10, ttft=0.3)

AGENTS = [
    Agent(name="shop", model=INVENTIVE, tools=[charge, reserve], max_steps=10),
    Agent(name="spender", model=SPENDER, tools=[noop], max_steps=1000),
    Agent(name="slow_spender", model=SLOW_SPENDER, tools=[noop], max_steps=1000),
]


def _install_kill_seams() -> None:
    """In a chaos worker: die right after the journal records a tool's result, or the model's response (which
    is recorded with its first tool call's start)."""
    from shared.engine import tools as tools_module

    record_result, start_call = tools_module.record_tool_result, tools_module.start_tool_call

    def record_result_then_maybe_die(events: Any, claim: Any, step: int, call_id: str, output: str,
                                     error: bool) -> None:
        record_result(events, claim, step, call_id, output, error)
        maybe_die("after_record", claim.turn_id, call_id, "result")

    def start_call_then_maybe_die(rt: Any, claim: Any, step: int, call: Any, key: str, *,
                                  response: Any = None) -> None:
        start_call(rt, claim, step, call, key, response=response)
        if response is not None:
            maybe_die("after_model", claim.turn_id, f"model-{claim.step}", "model")

    tools_module.record_tool_result = record_result_then_maybe_die  # type: ignore[assignment]
    tools_module.start_tool_call = start_call_then_maybe_die  # type: ignore[assignment]


if DB_URL is not None:
    _install_kill_seams()
