"""A thread's state as LangGraph reports it, read from the history (messages) and checkpoints.

Every read is scoped to the principal. The state after step ``s`` of a run is
the history of the turns before it plus the run's messages of steps up to
``s``, so a ``values`` frame replayed later says exactly what it said live.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from api.langgraph.convert import TOOLS_NODE, interrupt_of, message_dict, thread_metadata, thread_status
from api.serialize import ts
from shared.auth.principal import Principal
from shared.errors import NotFound
from shared.models import AgentSession, Checkpoint, Message, Turn, TurnStatus


def _mine(model: Any, who: Principal, session_id: str) -> tuple[Any, ...]:
    return model.session_id == session_id, model.tenant_id == who.tenant_id, model.user_id == who.user_id


def messages_until(db: Session, who: Principal, session_id: str, turn: Turn | None,
                   step: int | None) -> list[dict[str, Any]]:
    """The history as it stood after ``step`` of ``turn`` (all of it when ``turn`` is None; -1: before the turn)."""
    query = select(Message).where(*_mine(Message, who, session_id))
    if turn is not None:
        earlier = select(Turn.id).where(*_mine(Turn, who, session_id), Turn.seq < turn.seq)
        last_step = step if step is not None else 1 << 30
        query = query.where(or_(Message.turn_id.in_(earlier),
                                (Message.turn_id == turn.id) & (Message.step <= last_step)))
    return [message_dict(m) for m in db.scalars(query.order_by(Message.id))]


def step_messages(db: Session, who: Principal, session_id: str, turn_id: str, step: int) -> list[Message]:
    return list(db.scalars(select(Message).where(*_mine(Message, who, session_id), Message.turn_id == turn_id,
                                                 Message.step == step).order_by(Message.id)))


def active_and_last(db: Session, session: AgentSession) -> tuple[Turn | None, Turn | None]:
    """The turn holding the session (running or paused), and the newest turn."""
    active = db.get(Turn, session.active_turn_id) if session.active_turn_id else None
    last = db.scalars(select(Turn).where(Turn.session_id == session.id, Turn.tenant_id == session.tenant_id,
                                         Turn.user_id == session.user_id)
                      .order_by(Turn.seq.desc()).limit(1)).first()
    return active, last


def interrupts(turn: Turn | None) -> list[dict[str, Any]]:
    if turn is None or turn.status != TurnStatus.REQUIRES_ACTION:
        return []
    return [interrupt_of(turn.id, turn.pending)]


def thread_json(db: Session, who: Principal, session: AgentSession, *, with_values: bool = True) -> dict[str, Any]:
    active, last = active_and_last(db, session)
    paused = interrupts(active)
    return {
        "thread_id": session.id,
        "created_at": ts(session.created_at),
        "updated_at": ts(session.updated_at),
        "state_updated_at": ts(session.updated_at),
        "metadata": thread_metadata(session),
        "status": thread_status(session, active, last),
        "config": {},
        "values": {"messages": messages_until(db, who, session.id, None, None)} if with_values else None,
        "interrupts": {active.id: paused} if active is not None and paused else {},
        "error": (last.error if last is not None and active is None and last.error else None),
    }


def _checkpoint(session_id: str, number: int | None) -> dict[str, Any]:
    return {"thread_id": session_id, "checkpoint_ns": "", "checkpoint_id": str(number or 0), "checkpoint_map": {}}


def state_json(db: Session, who: Principal, session: AgentSession) -> dict[str, Any]:
    """``GET /threads/{id}/state``: the latest state, with the pending interrupt if paused."""
    newest = db.scalars(select(Checkpoint).where(*_mine(Checkpoint, who, session.id))
                        .order_by(Checkpoint.number.desc()).limit(2)).all()
    active, _ = active_and_last(db, session)
    return _state(session, messages_until(db, who, session.id, None, None), newest[0] if newest else None,
                  newest[1] if len(newest) > 1 else None, active)


def state_at_json(db: Session, who: Principal, session: AgentSession, checkpoint_id: str) -> dict[str, Any]:
    """The state at one kept checkpoint (404 if there is no such checkpoint)."""
    row = None
    if checkpoint_id.isdigit():
        row = db.scalars(select(Checkpoint).where(*_mine(Checkpoint, who, session.id),
                                                  Checkpoint.number == int(checkpoint_id))).first()
    if row is None:
        raise NotFound(f"no checkpoint {checkpoint_id!r} in thread {session.id!r}")
    states = history_json(db, who, session, 1, str(row.number + 1))
    newest = db.scalar(select(func.max(Checkpoint.number)).where(*_mine(Checkpoint, who, session.id)))
    if newest == row.number:
        active, _ = active_and_last(db, session)
        paused = interrupts(active)
        if paused and active is not None:
            states[0] = _state(session, states[0]["values"]["messages"], row, None, active) | {
                "parent_checkpoint": states[0]["parent_checkpoint"]}
    return states[0]


def history_json(db: Session, who: Principal, session: AgentSession, limit: int,
                 before: str | None) -> list[dict[str, Any]]:
    """``POST /threads/{id}/history``: one state per kept checkpoint (one per committed step), newest first."""
    query = select(Checkpoint).where(*_mine(Checkpoint, who, session.id))
    if before is not None and before.isdigit():
        query = query.where(Checkpoint.number < int(before))
    rows = db.scalars(query.order_by(Checkpoint.number.desc()).limit(limit + 1)).all()
    active, _ = active_and_last(db, session)
    out = []
    for i, row in enumerate(rows[:limit]):
        turn = db.get(Turn, row.turn_id)
        values = messages_until(db, who, session.id, turn, row.step) if turn is not None else []
        parent = rows[i + 1] if i + 1 < len(rows) else None
        out.append(_state(session, values, row, parent, active if i == 0 and before is None else None))
    return out


def _state(session: AgentSession, messages: list[dict[str, Any]], checkpoint: Checkpoint | None,
           parent: Checkpoint | None, active: Turn | None) -> dict[str, Any]:
    paused = interrupts(active)
    return {
        "values": {"messages": messages},
        "next": [TOOLS_NODE] if paused else [],
        "tasks": [{"id": f"{active.id}-task", "name": TOOLS_NODE, "path": [], "error": None,
                   "interrupts": paused, "checkpoint": None, "state": None, "result": None}]
        if paused and active is not None else [],
        "checkpoint": _checkpoint(session.id, checkpoint.number if checkpoint else None),
        "parent_checkpoint": _checkpoint(session.id, parent.number) if parent is not None else None,
        "metadata": {"source": "loop", "step": checkpoint.number if checkpoint else -1,
                     "run_id": checkpoint.turn_id if checkpoint else None, "parents": {}},
        "created_at": ts(checkpoint.created_at) if checkpoint else ts(session.created_at),
        "interrupts": paused,
    }
