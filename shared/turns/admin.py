"""A tenant's turns as its operator reads them (the console): every user's, one tenant only.

Each function takes a :class:`~shared.auth.principal.TenantAdmin` and a
session scoped to it. Row-level security (migration 0011) already hides other
tenants' rows; every query names the tenant as well, so the embedded SQLite
file (no RLS) keeps to it too. Nothing here writes: a change (an approval)
is made as the turn's user, through :mod:`shared.turns.service`.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from shared.auth.principal import Principal, TenantAdmin
from shared.errors import NotFound
from shared.models import AgentSession, Message, TraceSpan, Turn, TurnStatus

# The console's status filter: a word an operator thinks in, and the API statuses it covers.
STATUS_GROUPS: dict[str, tuple[str, ...]] = {
    "queued": (TurnStatus.QUEUED,),
    "running": (TurnStatus.IN_PROGRESS,),
    "paused": (TurnStatus.REQUIRES_ACTION,),
    "finished": (TurnStatus.COMPLETED, TurnStatus.FAILED, TurnStatus.CANCELLED, TurnStatus.EXPIRED,
                 TurnStatus.INCOMPLETE),
}
MAX_ROWS = 200


@dataclass(frozen=True)
class TurnRow:
    turn: Turn
    agent: str

    @property
    def principal(self) -> Principal:
        return Principal(self.turn.tenant_id, self.turn.user_id)


def _turns(admin: TenantAdmin) -> Select[Turn, str]:
    return (select(Turn, AgentSession.agent).join(AgentSession, AgentSession.id == Turn.session_id)
            .where(Turn.tenant_id == admin.tenant_id, AgentSession.tenant_id == admin.tenant_id))


def list_turns(db: Session, admin: TenantAdmin, *, status: str | None = None, agent: str | None = None,
               user: str | None = None, limit: int = 100) -> list[TurnRow]:
    """The tenant's newest turns, optionally of one status group, agent or user."""
    query = _turns(admin)
    if status:
        query = query.where(Turn.status.in_(STATUS_GROUPS.get(status, (status,))))
    if agent:
        query = query.where(AgentSession.agent == agent)
    if user:
        query = query.where(Turn.user_id == user)
    rows = db.execute(query.order_by(Turn.created_at.desc(), Turn.id.desc()).limit(min(limit, MAX_ROWS)))
    return [TurnRow(turn, agent_name) for turn, agent_name in rows]


def get_turn(db: Session, admin: TenantAdmin, turn_id: str) -> TurnRow:
    row = db.execute(_turns(admin).where(Turn.id == turn_id)).first()
    if row is None:
        raise NotFound(f"no turn {turn_id!r} in this tenant")
    return TurnRow(row[0], row[1])


def turn_messages(db: Session, admin: TenantAdmin, turn: Turn) -> list[Message]:
    return list(db.scalars(select(Message).where(
        Message.tenant_id == admin.tenant_id, Message.turn_id == turn.id, Message.session_id == turn.session_id)
        .order_by(Message.id)))


def turn_spans(db: Session, admin: TenantAdmin, turn_id: str) -> list[TraceSpan]:
    return list(db.scalars(select(TraceSpan).where(
        TraceSpan.tenant_id == admin.tenant_id, TraceSpan.turn_id == turn_id)
        .order_by(TraceSpan.started_at, TraceSpan.id)))


def waiting_turns(db: Session, admin: TenantAdmin) -> list[TurnRow]:
    """Every turn of the tenant waiting for an approval or an answer, oldest first."""
    rows = db.execute(_turns(admin).where(Turn.status == TurnStatus.REQUIRES_ACTION)
                      .order_by(Turn.paused_at.asc().nulls_last(), Turn.id).limit(MAX_ROWS))
    return [TurnRow(turn, agent_name) for turn, agent_name in rows]
