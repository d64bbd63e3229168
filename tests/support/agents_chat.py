"""Agents of the first-hour tests (STEPRUN_AGENTS=tests.support.agents_chat): the chat client, limits, tools."""
from __future__ import annotations

import asyncio

from shared.agent import Agent, tool
from shared.demo_agents import transfer


@tool
async def shout(text: str) -> str:
    """Say a text louder (an async tool: awaited, its result reaches the model)."""
    await asyncio.sleep(0.01)
    return text.upper()


@tool
def explode(text: str) -> str:
    """Always fails (its exception is logged with the turn and step)."""
    raise RuntimeError(f"boom on {text}")


AGENTS = [
    # Long enough to be interrupted: 400 words at 40 tokens/s (10 s).
    Agent(name="long", model="scripted:tps=40,words=400"),
    Agent(name="echo", model="scripted"),
    Agent(name="bank", model="scripted", tools=[transfer]),
    Agent(name="tools", model="scripted", tools=[shout, explode]),
    # OPENAI_BASE_URL points at a server that never answers: the step time limit and cancel must cut it.
    Agent(name="hang", model="openai:gpt-test"),
]
