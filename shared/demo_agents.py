"""Built-in demo agents, served when STEPRUN_AGENTS is unset. They run offline."""
from __future__ import annotations

from shared.agent import Agent, tool


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend
        b: the second addend
    """
    return a + b


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


@tool
def word_count(text: str) -> int:
    """Count the words in a text."""
    return len(text.split())


@tool(requires_approval=True)
def transfer(to: str, amount: float) -> str:
    """Move money to someone (asks the user first)."""
    return f"sent {amount:.2f} to {to}"


AGENTS = [
    Agent(
        name="math",
        description="Adds and multiplies: calls a tool, then answers with its result.",
        instructions="You add and multiply numbers using your tools.",
        model="scripted:ttft=0.02,tps=200",
        tools=[add, multiply, word_count],
        max_steps=8,
    ),
    Agent(
        name="echo",
        description="Echoes the input and streams a long answer after it.",
        instructions="You repeat what you are told.",
        model="scripted:ttft=0.02,tps=100,words=60",
    ),
    Agent(
        name="bank",
        description="Transfers money, but only after the user approves.",
        instructions="You move money when asked, with the user's approval.",
        model="scripted:ttft=0.02,tps=200",
        tools=[transfer, add],
    ),
]
