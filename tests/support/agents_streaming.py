"""Agents for the streaming tests (STEPRUN_AGENTS=tests.support.agents_streaming): the demo ones plus long talkers."""
from shared.agent import Agent
from shared.demo_agents import AGENTS as DEMO_AGENTS

AGENTS = [
    *DEMO_AGENTS,
    # About 2 s of streaming: long enough to drop a connection in the middle of it.
    Agent(name="long", description="Streams 400 words at 200 tokens/s.", model="scripted:ttft=0.05,tps=200,words=400"),
    # Fast and large: fills a small socket buffer in about a second, for the slow-consumer test.
    Agent(name="flood", description="Streams 6000 words at 2000 tokens/s.",
          model="scripted:ttft=0.05,tps=2000,words=6000"),
    # Short, for many concurrent sessions.
    Agent(name="brief", description="Echoes with 20 words.", model="scripted:ttft=0.02,tps=200,words=20"),
]
