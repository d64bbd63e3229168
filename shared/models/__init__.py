"""SQLAlchemy 2 models, one module per domain; importing the package registers every table.

Importing any model module loads this package first, so ``Base.metadata`` always
holds the whole schema (Alembic and the tests rely on it).
"""
from shared.models.auth import ApiKey, QueueSample, Tenant, WorkerHeartbeat
from shared.models.base import Base, BigId, JSONType, new_id, table_of
from shared.models.journal import ModelCall, ToolCall, UsageCounter
from shared.models.schedules import Schedule
from shared.models.storage import KnowledgeChunk, KnowledgeDocument, MemoryItem, TraceSpan
from shared.models.turns import ACTIVE, TERMINAL, AgentSession, Checkpoint, Message, StreamEvent, Turn, TurnStatus
from shared.models.webhooks import WebhookDelivery, WebhookEndpoint, WebhookEvent

__all__ = [
    "ACTIVE", "TERMINAL", "TurnStatus",
    "AgentSession", "ApiKey", "Base", "BigId", "Checkpoint", "JSONType", "KnowledgeChunk", "KnowledgeDocument",
    "MemoryItem", "Message", "ModelCall", "QueueSample", "Schedule", "StreamEvent", "Tenant", "ToolCall", "TraceSpan",
    "Turn", "UsageCounter", "WebhookDelivery", "WebhookEndpoint", "WebhookEvent", "WorkerHeartbeat", "new_id",
    "table_of",
]
