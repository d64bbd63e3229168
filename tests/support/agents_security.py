"""Agents for the security tests (STEPRUN_AGENTS=tests.support.agents_security); the demo agents are served beside them.

``notes``: its tool ``late_note <path>`` waits until the file ``path`` exists (the test creates it once the
user's data is erased), then at once writes ``notes/late`` to the user's memory: a tool still running when its
user erases their data, as in the hardening issue's erasure attack.

``inventor``'s model calls tools that no agent registers, as a confused or hostile model may: input
``invent N`` makes one step of N calls named ``made_up_0`` .. ``made_up_<N-1>``, plus one call to its one real
tool, ``add``.
"""
from __future__ import annotations

import os
import re
import time
from typing import Any

from shared.agent import Agent, ToolContext, tool
from shared.demo_agents import AGENTS as DEMO_AGENTS
from shared.demo_agents import add
from shared.llm.base import ChatMessage, ToolCallRequest
from shared.llm.scripted import Reply, ScriptedModel


@tool
def late_note(path: str, ctx: ToolContext) -> str:
    """Wait until the file ``path`` exists (at most 30 s), then remember a note under notes/late."""
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    ctx.memory.put("notes", "late", {"text": "back from the dead"})
    return "noted"


def _invent(messages: list[ChatMessage], tools: list[dict[str, Any]]) -> Reply:  # noqa: ARG001
    last = messages[-1] if messages else {"role": "user", "content": ""}
    if last.get("role") == "tool":
        return Reply(text="done")
    found = re.search(r"invent (\d+)", str(last.get("content") or ""))
    count = int(found.group(1)) if found else 0
    calls = [ToolCallRequest(id=f"call_{i}", name=f"made_up_{i}", arguments={}) for i in range(count)]
    calls.append(ToolCallRequest(id="call_add", name="add", arguments={"a": 1, "b": 2}))
    return Reply(tool_calls=calls)


AGENTS = [
    *DEMO_AGENTS,
    Agent(name="notes", model="scripted:ttft=0.01,tps=200", tools=[late_note]),
    Agent(name="inventor", model=ScriptedModel(script=_invent), tools=[add], max_steps=4),
]
