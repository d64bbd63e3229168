"""Agents for the console's browser tests (STEPRUN_AGENTS=tests.support.agents_console)."""
from shared.agent import Agent
from shared.demo_agents import add, transfer

AGENTS = [
    # Slow enough (about 2 s) that the live table shows it running before it completes.
    Agent(name="echo", description="Echoes slowly.", model="scripted:ttft=0.3,tps=25,words=40"),
    Agent(name="math", description="Calls add, then answers.", model="scripted:ttft=0.05,tps=200", tools=[add]),
    Agent(name="bank", description="Transfers money after an approval.", model="scripted:ttft=0.02,tps=200",
          tools=[transfer]),
]
