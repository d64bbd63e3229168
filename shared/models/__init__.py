"""SQLAlchemy 2 models, one module per domain; importing the package registers every table.

Importing any model module loads this package first, so ``Base.metadata`` always
holds the whole schema (Alembic and the tests rely on it).
"""
from shared.models.auth import ApiKey, Tenant
from shared.models.base import Base, BigId, JSONType, new_id
from shared.models.storage import KnowledgeChunk, KnowledgeDocument, MemoryItem, TraceSpan
from shared.models.turns import ACTIVE, TERMINAL, AgentSession, Checkpoint, Message, StreamEvent, Turn, TurnStatus

__all__ = [
    "ACTIVE", "TERMINAL", "TurnStatus",
    "AgentSession", "ApiKey", "Base", "BigId", "Checkpoint", "JSONType", "KnowledgeChunk", "KnowledgeDocument",
    "MemoryItem", "Message", "StreamEvent", "Tenant", "TraceSpan", "Turn", "new_id",
]
