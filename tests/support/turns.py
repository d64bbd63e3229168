"""Starting a turn in a test: a new session of ``agent`` for ``who``, with one turn of ``text`` queued."""
from __future__ import annotations

from shared.auth.principal import Principal
from shared.db import unit_of_work
from shared.runtime import Runtime
from shared.turns import service as turns


def start_turn(rt: Runtime, who: Principal, agent: str, text: str) -> tuple[str, str]:
    """(session id, turn id) of a new session with one queued turn."""
    with unit_of_work(rt.sessions, who) as db:
        session = turns.create_session(db, rt, who, agent, None)
        turn, _ = turns.create_turn(db, rt, who, session.id, text)
        return session.id, turn.id
