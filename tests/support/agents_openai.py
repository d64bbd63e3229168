"""Agents served by the openai: end-to-end test (STEPRUN_AGENTS=tests.support.agents_openai)."""
from shared.agent import Agent
from shared.demo_agents import add

AGENTS = [Agent(name="gpt", instructions="Add numbers with your tool.", model="openai:gpt-test", tools=[add])]
