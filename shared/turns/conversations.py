"""Conversations of the OpenAI-compatible surface: sessions whose agent the first response binds.

A conversation may be created before anyone names a model (``POST
/v1/conversations``); its session then has no agent (``""``) until the first
response names one. Items given at creation become the start of its history:
messages in the history table and a first checkpoint, so the agent sees them.
Service functions: the database session first, no commit (the edge commits).
"""
from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from shared.auth.principal import Principal
from shared.errors import BadInput, TooLarge
from shared.models import TERMINAL, AgentSession, Checkpoint, Message, Turn
from shared.runtime import Runtime
from shared.turns.service import create_session

UNBOUND = ""
# Seeded history belongs to no turn.
SEED_TURN = ""


def create_conversation(db: Session, rt: Runtime, who: Principal, metadata: Any,
                        history: list[dict[str, str]]) -> AgentSession:
    """A session with no agent yet, and ``history`` ({role, content} messages) as its first checkpoint."""
    name = next(iter(a.name for a in rt.agents), None)
    if name is None:
        raise BadInput("this deployment serves no agents")
    row = create_session(db, rt, who, name, metadata)  # its checks of metadata, then unbind
    row.agent = UNBOUND
    seed_history(db, rt, who, row, history)
    return row


def seed_history(db: Session, rt: Runtime, who: Principal, session: AgentSession,
                 history: list[dict[str, str]]) -> None:
    """Write ``history`` as the session's first messages and checkpoint (the session must have none)."""
    if not history:
        return
    if len(json.dumps(history)) > rt.settings.max_input_chars * 4:
        raise TooLarge(f"the items are larger than {rt.settings.max_input_chars * 4} characters", field="items")
    for message in history:
        db.add(Message(session_id=session.id, tenant_id=who.tenant_id, user_id=who.user_id, turn_id=SEED_TURN,
                       step=0, role=message["role"], content=message["content"]))
    db.add(Checkpoint(session_id=session.id, tenant_id=who.tenant_id, user_id=who.user_id, number=1,
                      turn_id=SEED_TURN, step=0, state={"messages": list(history)}))
    db.flush()


def bind_agent(rt: Runtime, session: AgentSession, agent: str) -> None:
    """Bind an unbound conversation to ``agent``; a bound one must already be ``agent``'s (400 otherwise)."""
    if session.agent == UNBOUND:
        session.agent = agent
    elif session.agent != agent:
        raise BadInput(f"this conversation is with model {session.agent!r}; it cannot continue with {agent!r}",
                       field="model")


def update_metadata(db: Session, rt: Runtime, session: AgentSession, metadata: Any) -> None:
    if not isinstance(metadata, dict):
        raise BadInput("'metadata' must be an object", field="metadata")
    if len(json.dumps(metadata)) > rt.settings.max_metadata_bytes:
        raise TooLarge(f"'metadata' is larger than {rt.settings.max_metadata_bytes} bytes", field="metadata")
    session.metadata_ = metadata


def delete_turn(db: Session, who: Principal, turn: Turn) -> None:
    """Delete a finished turn and its trace; its messages stay in the session's history."""
    if turn.status not in TERMINAL or turn.tenant_id != who.tenant_id or turn.user_id != who.user_id:
        raise ValueError("delete_turn takes a finished turn of the caller")
    db.delete(turn)
    db.flush()
