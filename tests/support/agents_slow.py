"""A slow streaming agent for tests that interrupt a turn mid-stream (STEPRUN_AGENTS=tests.support.agents_slow)."""
from shared.agent import Agent
from shared.demo_agents import add

AGENTS = [
    Agent(name="slow", description="Streams 150 words at 100 tokens/s.", model="scripted:tps=100,words=150"),
    Agent(name="math", model="scripted", tools=[add]),
]
