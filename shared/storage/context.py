"""What the step engine hands a tool beyond ids: the principal's memory and knowledge."""
from __future__ import annotations

from typing import Any

from shared.auth.principal import Principal
from shared.runtime import Runtime
from shared.storage.knowledge import KnowledgeBase
from shared.storage.memory import MemoryStore


def tool_storage(rt: Runtime, who: Principal) -> dict[str, Any]:
    """ToolContext fields ``memory`` and ``knowledge``, bound to ``who``.

    Built per tool call: nothing a tool can reach outlives the call or crosses
    to another principal.
    """
    return {"memory": MemoryStore(rt.sessions, rt.settings, who),
            "knowledge": KnowledgeBase(rt.sessions, rt.settings, who)}
