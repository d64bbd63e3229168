"""What the step engine hands a tool beyond ids: the principal's memory and knowledge."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from shared.auth.principal import Principal
from shared.runtime import Runtime
from shared.storage.knowledge import KnowledgeBase
from shared.storage.memory import MemoryStore


def tool_storage(rt: Runtime, who: Principal, fence: Callable[[Session], None] | None = None) -> dict[str, Any]:
    """ToolContext fields ``memory`` and ``knowledge``, bound to ``who``.

    Built per tool call: nothing a tool can reach outlives the call or crosses
    to another principal. ``fence`` guards every memory write (see :class:`MemoryStore`).
    """
    return {"memory": MemoryStore(rt.sessions, rt.settings, who, fence),
            "knowledge": KnowledgeBase(rt.sessions, rt.settings, who)}
