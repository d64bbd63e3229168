"""Agents for the OpenAI-compatible surface's tests (STEPRUN_AGENTS=tests.support.agents_responses)."""
from shared.agent import Agent
from shared.demo_agents import AGENTS as DEMO_AGENTS

AGENTS = [
    *DEMO_AGENTS,
    # About 2 s of streaming: long enough to cancel, drop a connection or kill a worker in the middle of it.
    Agent(name="long", description="Streams 400 words at 200 tokens/s.", model="scripted:ttft=0.05,tps=200,words=400"),
]
