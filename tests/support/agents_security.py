"""Agents for the transport hardening tests (STEPRUN_AGENTS=tests.support.agents_security).

``inventor``'s model calls tools that no agent registers, as a confused or hostile
model may: input ``invent N`` makes one step of N calls named ``made_up_0`` ..
``made_up_<N-1>``, plus one call to its one real tool, ``add``. The demo agents
are served beside it.
"""
from __future__ import annotations

import re
from typing import Any

from shared.agent import Agent
from shared.demo_agents import AGENTS as DEMO_AGENTS
from shared.demo_agents import add
from shared.llm.base import ChatMessage, ToolCallRequest
from shared.llm.scripted import Reply, ScriptedModel


def _invent(messages: list[ChatMessage], tools: list[dict[str, Any]]) -> Reply:  # noqa: ARG001
    last = messages[-1] if messages else {"role": "user", "content": ""}
    if last.get("role") == "tool":
        return Reply(text="done")
    found = re.search(r"invent (\d+)", str(last.get("content") or ""))
    count = int(found.group(1)) if found else 0
    calls = [ToolCallRequest(id=f"call_{i}", name=f"made_up_{i}", arguments={}) for i in range(count)]
    calls.append(ToolCallRequest(id="call_add", name="add", arguments={"a": 1, "b": 2}))
    return Reply(tool_calls=calls)


AGENTS = [*DEMO_AGENTS, Agent(name="inventor", model=ScriptedModel(script=_invent), tools=[add], max_steps=4)]
