"""The demo agents plus one whose tool writes memory late (STEPRUN_AGENTS=tests.support.agents_security).

``late_note <path>`` waits until the file ``path`` exists (the test creates it once the user's data
is erased), then at once writes ``notes/late`` to the user's memory: a tool still running when its
user erases their data, as in the hardening issue's erasure attack.
"""
from __future__ import annotations

import os
import time

from shared.agent import Agent, ToolContext, tool
from shared.demo_agents import AGENTS as DEMO


@tool
def late_note(path: str, ctx: ToolContext) -> str:
    """Wait until the file ``path`` exists (at most 30 s), then remember a note under notes/late."""
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    ctx.memory.put("notes", "late", {"text": "back from the dead"})
    return "noted"


AGENTS = [*DEMO, Agent(name="notes", model="scripted:ttft=0.01,tps=200", tools=[late_note])]
