"""Agents for the recovery and lifecycle tests (STEPRUN_AGENTS=tests.support.agents_recovery).

Every agent is the scripted model, so runs are deterministic and offline. The
ones that matter here stream long enough to be killed, cancelled or timed out
in the middle of a step.
"""
from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

from shared.agent import Agent, ask_user, tool
from shared.demo_agents import add, transfer
from shared.llm.scripted import FILLER, Reply, ScriptedModel, _tool_call_for


def _filler(n: int) -> str:
    return " ".join(FILLER[i % len(FILLER)] for i in range(n))


class Talkative(ScriptedModel):
    """The default script, but every step streams: it talks before calling a tool and after its result."""

    def __init__(self, *, answer_words: int | None = None, **options: Any):
        super().__init__(**options)
        self.answer_words = self.words if answer_words is None else answer_words

    def default_script(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Reply:
        last = messages[-1]
        if last.get("role") == "tool":
            return Reply(text=f"The result of {last.get('name')} is {last.get('content')}. "
                              f"{_filler(self.answer_words)}")
        call = _tool_call_for(str(last.get("content") or ""), tools, turn_index=len(messages))
        if call is not None:
            return Reply(text=f"Let me use {call.name}. {_filler(self.words)}", tool_calls=[call])
        return Reply(text=f"You said: {last.get('content')} {_filler(self.words)}")


@tool
def slow_lookup(seconds: float) -> str:
    """Look something up slowly (sleeps ``seconds``)."""
    time.sleep(seconds)
    return f"found after {seconds:g} s"


@tool
def tick(n: int) -> int:
    """Take a short while, then return ``n`` plus one."""
    time.sleep(0.4)
    return n + 1


@tool
def hang(seconds: float) -> str:
    """Block for a long time, as a tool stuck on the network would."""
    time.sleep(seconds)
    return "woke up"


# Idempotent, so each attempt runs it again (and dies again) until STEPRUN_MAX_ATTEMPTS: a tool
# not marked so would, after the first death, pause its turn as tool_outcome_unknown instead.
@tool(idempotent=True)
def crash(code: int) -> str:
    """Kill the worker process running this step, as an out-of-memory kill would."""
    os.kill(os.getpid(), signal.SIGKILL)
    return "unreachable"


def _paced(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Reply:
    """'say N' streams N words: one agent for turns short and long."""
    match = re.search(r"say (\d+)", str(messages[-1].get("content") or ""))
    n = int(match.group(1)) if match else 5
    return Reply(text=f"Saying {n} words: {_filler(n)}")


def _loop(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Reply:
    """Calls ``tick`` again after every result: a turn that only a limit ends."""
    from shared.llm.base import ToolCallRequest

    last = messages[-1]
    n = int(last["content"]) if last.get("role") == "tool" else 0
    return Reply(text=f"tick {n}. ", tool_calls=[ToolCallRequest(id=f"t{len(messages)}", name="tick",
                                                                arguments={"n": n})])


AGENTS = [
    # Streams ~1.2 s per step; with a tool named in the input, a turn is two streaming steps.
    Agent(name="streamer", model=Talkative(ttft=0.02, tps=50, words=60), tools=[add]),
    # 'say N' streams N words at 40 a second: for cancel, interrupt and shutdown in mid-stream.
    Agent(name="paced", model=ScriptedModel(ttft=0.02, tps=40, script=_paced)),
    # One step longer than the lease: ~3.2 s of streaming, then a 3.2 s tool call.
    Agent(name="slowpoke", model=Talkative(ttft=0.02, tps=15, words=45, answer_words=3), tools=[slow_lookup]),
    Agent(name="quick", model="scripted:tps=0,words=3"),
    Agent(name="bank", model="scripted:ttft=0.02,tps=200", tools=[transfer, add, ask_user]),
    Agent(name="onestep", model="scripted", tools=[add], max_steps=1),
    Agent(name="terse", model="scripted:words=40", max_output_tokens=5),
    Agent(name="looper", model=ScriptedModel(tps=100, script=_loop), tools=[tick], max_steps=50),
    Agent(name="stuck", model="scripted", tools=[hang]),
    Agent(name="poison", model="scripted", tools=[crash]),
]
