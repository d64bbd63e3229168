"""Built-in demo agents, served when STEPRUN_AGENTS is unset. They run offline."""
from __future__ import annotations

from shared.agent import Agent, ask_user, tool
from shared.builtin_tools import recall, remember, search_knowledge


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
        description="Transfers money, but only after the user approves; may ask the user a question.",
        instructions="You move money when asked, with the user's approval.",
        model="scripted:ttft=0.02,tps=200",
        tools=[transfer, add, ask_user],
    ),
    Agent(
        name="assistant",
        description="Remembers facts across conversations and searches your documents, citing them.",
        instructions="You remember what the user asks you to, recall it later, and answer from their "
                     "documents with numbered citations.",
        model="scripted:ttft=0.02,tps=200",
        tools=[remember, recall, search_knowledge],
    ),
]
