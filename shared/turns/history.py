"""A user's history as a whole: export one session, erase everything of one user.

Service functions: the database session first, no commit (the edge commits);
Redis work (deleting event logs, cancel flags) is registered to run after the
commit, so a rolled-back erase leaves the logs alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from shared import checkpoints
from shared.auth.principal import Principal
from shared.db import after_commit, rowcount
from shared.models import (
    ACTIVE,
    AgentSession,
    Checkpoint,
    KnowledgeChunk,
    KnowledgeDocument,
    MemoryItem,
    Message,
    ModelCall,
    Schedule,
    ToolCall,
    TraceSpan,
    Turn,
    WebhookEvent,
)
from shared.runtime import Runtime
from shared.streaming.protocol import Fence
from shared.turns.service import get_session, get_turn


@dataclass
class SessionExport:
    session: AgentSession
    turns: list[Turn]
    messages: list[Message]
    checkpoint: Checkpoint | None
    # The whole history as of ``checkpoint`` (it may store only what its step added: shared/checkpoints.py).
    checkpoint_messages: list[Any] | None
    spans: list[TraceSpan]


def export_session(db: Session, who: Principal, session_id: str) -> SessionExport:
    """Everything stored about one of ``who``'s sessions (404 if it is not theirs)."""
    session = get_session(db, who, session_id)

    def owned(model: Any) -> tuple[Any, ...]:
        return model.session_id == session.id, model.tenant_id == who.tenant_id, model.user_id == who.user_id

    turns = list(db.scalars(select(Turn).where(*owned(Turn)).order_by(Turn.seq)))
    messages = list(db.scalars(select(Message).where(*owned(Message)).order_by(Message.id)))
    checkpoint = db.scalars(select(Checkpoint).where(*owned(Checkpoint))
                            .order_by(Checkpoint.number.desc()).limit(1)).first()
    spans = list(db.scalars(select(TraceSpan).where(*owned(TraceSpan))
                            .order_by(TraceSpan.started_at, TraceSpan.id)))
    whole = checkpoints.messages(db, checkpoint) if checkpoint is not None else None
    return SessionExport(session, turns, messages, checkpoint, whole, spans)


@dataclass
class ErasureReport:
    sessions: int = 0
    turns: int = 0
    messages: int = 0
    checkpoints: int = 0
    trace_spans: int = 0
    memory_items: int = 0
    knowledge_documents: int = 0
    schedules: int = 0
    tool_calls: int = 0
    model_responses: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def erase_user(db: Session, rt: Runtime, who: Principal) -> ErasureReport:
    """Delete every row of ``who`` and, after commit, their sessions' event logs.

    Kept: tenant-wide knowledge (it belongs to the tenant, and carries no user
    id), API keys (credentials; revoking them is the operator's call) and the
    usage counters (numbers only; erasing them would reset the user's budgets).
    Rows are deleted table by table, children first, rather than left to the
    cascade, so the report counts them and nothing of the user's can survive
    in a row whose session is not theirs.

    The erasure is final: work already running writes nothing back. Every write
    a step makes outside its commit (the tool journal, the model-call record, a
    tool's ``ctx.memory``) first takes a share lock on its turn row and checks
    that the turn is still its own (``shared.engine.journal.fenced``); the step's
    commit does the same with the session and turn. Locking every one of the
    user's turn rows here, before anything is deleted, makes the two exclusive:
    a write already holding its turn finishes first (and is deleted below, each
    DELETE seeing what committed before it), one that comes later finds its turn
    gone and is refused. After the commit, each running turn is cancelled and its
    event-log fence closed, so a step still streaming appends nothing to the
    deleted logs.
    """
    report = ErasureReport()
    session_ids = list(db.scalars(select(AgentSession.id).where(
        AgentSession.tenant_id == who.tenant_id, AgentSession.user_id == who.user_id).with_for_update()))
    # Sessions first, then turns: the lock order of the step's commit and of the API's cancel.
    turns = db.execute(select(Turn.id, Turn.session_id, Turn.status).where(
        Turn.tenant_id == who.tenant_id, Turn.user_id == who.user_id).with_for_update()).all()
    running = [(t.id, t.session_id) for t in turns if t.status in ACTIVE]

    def drop(model: Any, where: tuple[Any, ...] | None = None) -> int:
        clauses = where if where is not None else (model.tenant_id == who.tenant_id, model.user_id == who.user_id)
        return rowcount(db.execute(delete(model).where(*clauses).execution_options(synchronize_session=False)))

    report.trace_spans = drop(TraceSpan)
    report.tool_calls = drop(ToolCall)
    report.model_responses = drop(ModelCall)
    report.messages = drop(Message)
    report.checkpoints = drop(Checkpoint)
    report.turns = drop(Turn)
    report.sessions = drop(AgentSession)
    report.memory_items = drop(MemoryItem)
    report.schedules = drop(Schedule)
    drop(WebhookEvent)  # unsent outbox events of the user's turns (sent ones live on as the tenant's deliveries)
    mine = (KnowledgeDocument.tenant_id == who.tenant_id, KnowledgeDocument.user_id == who.user_id)
    drop(KnowledgeChunk)  # the cascade would too; explicit so SQLite's FTS triggers see each row go
    report.knowledge_documents = drop(KnowledgeDocument, mine)
    db.expire_all()  # bulk deletes bypass the identity map: nothing stale may be flushed back

    def clean_redis() -> None:
        # A step still running finds its turn gone at its next write and at its commit, and writes
        # nothing; the cancel flag stops it sooner, and the closed fence refuses its deltas.
        for turn_id, session_id in running:
            rt.events.request_cancel(turn_id)
            rt.events.append_events(session_id, [], fence=Fence(turn_id, close=True))
        for session_id in session_ids:
            rt.events.delete(session_id)

    after_commit(db, clean_redis)
    return report


def list_spans(db: Session, who: Principal, turn_id: str) -> list[TraceSpan]:
    """The turn's spans in start order; the turn must be the principal's (404 otherwise)."""
    get_turn(db, who, turn_id)
    return list(db.scalars(
        select(TraceSpan).where(TraceSpan.turn_id == turn_id, TraceSpan.tenant_id == who.tenant_id,
                                TraceSpan.user_id == who.user_id)
        .order_by(TraceSpan.started_at, TraceSpan.id)
    ))
