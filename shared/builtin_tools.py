"""Tools every agent may list: long-term memory and knowledge search.

```python
from shared.builtin_tools import recall, remember, search_knowledge
Agent(name="assistant", tools=[remember, recall, search_knowledge], ...)
```

They reach storage only through the call's :class:`~shared.agent.ToolContext`,
so they read and write the calling user's data and nobody else's.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from shared.agent import ToolContext, tool

FACTS = "facts"  # the memory namespace `remember` writes and `recall` searches first
SNIPPET_CHARS = 400


def _require(store: Any, what: str) -> Any:
    if store is None:
        raise RuntimeError(f"{what} is not available to this tool call")
    return store


@tool
def remember(fact: str, ctx: ToolContext) -> str:
    """Save a fact about the user to long-term memory, for later conversations.

    Args:
        fact: the fact, in a short sentence
    """
    fact = fact.strip()
    if not fact:
        raise ValueError("there is nothing to remember")
    # Keyed by content, so a retried attempt of this call stores the fact once.
    key = "fact-" + hashlib.sha256(fact.lower().encode()).hexdigest()[:16]
    _require(ctx.memory, "memory").put(FACTS, key, {"text": fact, "session_id": ctx.session_id})
    return f"Remembered: {fact}"


@tool
def recall(query: str, ctx: ToolContext) -> str:
    """Search the user's long-term memory (facts saved in any earlier conversation).

    Args:
        query: what to look for, in words
    """
    hits = _require(ctx.memory, "memory").search(query, limit=5)
    if not hits:
        return "No memories match that"
    return "; ".join(_memory_text(h["value"]) for h in hits)


@tool
def search_knowledge(query: str, ctx: ToolContext) -> str:
    """Search the documents uploaded for this user and their organisation; cite the numbered sources.

    Args:
        query: what to look for, in words
    """
    hits = _require(ctx.knowledge, "knowledge").search(query, limit=3)
    if not hits:
        return "No documents match that"
    parts = []
    for i, hit in enumerate(hits, 1):
        snippet = " ".join(hit.text.split())
        snippet = snippet if len(snippet) <= SNIPPET_CHARS else snippet[:SNIPPET_CHARS] + "…"
        parts.append(f'[{i}] "{hit.title}" ({hit.document_id}): {snippet}')
    return " ".join(parts)


def _memory_text(value: Any) -> str:
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return value["text"]
    return value if isinstance(value, str) else json.dumps(value)
