"""What the step engine hands a tool beyond ids: the principal's memory and knowledge."""
from __future__ import annotations

from typing import Any

from shared.keys import Principal
from shared.knowledge import KnowledgeBase
from shared.memory import MemoryStore
from shared.runtime import Runtime


def tool_storage(rt: Runtime, owner: Any) -> dict[str, Any]:
    """ToolContext fields ``memory`` and ``knowledge``, bound to ``owner``'s (tenant_id, user_id).

    Built per tool call: nothing a tool can reach outlives the call or crosses
    to another principal.
    """
    who = Principal(owner.tenant_id, owner.user_id)
    return {"memory": MemoryStore(rt.sessions, rt.settings, who),
            "knowledge": KnowledgeBase(rt.sessions, rt.settings, who)}
