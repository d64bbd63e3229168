"""The slow streaming agent beside the demo agents (STEPRUN_AGENTS=tests.support.agents_slow_and_storage)."""
from shared.demo_agents import AGENTS as DEMO
from tests.support.agents_slow import AGENTS as SLOW

AGENTS = [*DEMO, *(a for a in SLOW if a.name == "slow")]
