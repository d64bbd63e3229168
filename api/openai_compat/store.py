"""Reading responses and conversations: each a few scoped queries through shared/turns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.openai_compat import ids, objects
from api.openai_compat.ids import ResponseRef
from shared.agent import Agent
from shared.auth.principal import Principal
from shared.errors import NotFound
from shared.models import AgentSession, Message, Turn
from shared.runtime import Runtime
from shared.turns import service as turns


@dataclass
class Loaded:
    seg: objects.Segment
    session: AgentSession
    agent: Agent | None

    def json(self, **overrides: Any) -> dict[str, Any]:
        return objects.response_json(self.seg, self.session, self.agent, **overrides)


def turn_messages(db: Session, who: Principal, turn: Turn) -> list[Message]:
    return list(db.scalars(
        select(Message).where(Message.turn_id == turn.id, Message.session_id == turn.session_id,
                              Message.tenant_id == who.tenant_id, Message.user_id == who.user_id)
        .order_by(Message.id)))


def load(db: Session, rt: Runtime, who: Principal, ref: ResponseRef) -> Loaded:
    """The response ``ref`` names, if it is ``who``'s (404 in OpenAI's words otherwise)."""
    try:
        turn = turns.get_turn(db, who, ref.turn_id)
    except NotFound:
        raise NotFound(f"No response found with id '{ref.id}'.", field="response_id") from None
    seg = objects.segment(turn, turn_messages(db, who, turn), ref.start)
    if seg is None:
        raise NotFound(f"No response found with id '{ref.id}'.", field="response_id")
    session = turns.get_session(db, who, turn.session_id)
    return Loaded(seg, session, rt.agents.get(session.agent))


def latest_response(db: Session, rt: Runtime, who: Principal, turn: Turn) -> Loaded:
    """The newest segment of ``turn``: what a resume or a new input is answered with."""
    rows = turn_messages(db, who, turn)
    starts = objects.segment_starts(objects.steps_of(rows))
    for start in reversed(starts):
        seg = objects.segment(turn, rows, start)
        if seg is not None:
            session = turns.get_session(db, who, turn.session_id)
            return Loaded(seg, session, rt.agents.get(session.agent))
    raise NotFound(f"No response found for turn {turn.id}")  # unreachable: segment 0 always exists


def conversation(db: Session, who: Principal, conversation_id: str, field: str = "conversation_id") -> AgentSession:
    session_id = ids.parse_conversation_id(conversation_id, field)
    try:
        return turns.get_session(db, who, session_id)
    except NotFound:
        raise NotFound(f"No conversation found with id '{conversation_id}'.", field=field) from None


def conversation_items(db: Session, rt: Runtime, who: Principal, session: AgentSession) -> list[dict[str, Any]]:
    owned = (Turn.session_id == session.id, Turn.tenant_id == who.tenant_id, Turn.user_id == who.user_id)
    turn_rows = list(db.scalars(select(Turn).where(*owned).order_by(Turn.seq)))
    messages = list(db.scalars(
        select(Message).where(Message.session_id == session.id, Message.tenant_id == who.tenant_id,
                              Message.user_id == who.user_id).order_by(Message.id)))
    return objects.conversation_items(turn_rows, messages, {session.agent: rt.agents.get(session.agent)},
                                      session.agent)
