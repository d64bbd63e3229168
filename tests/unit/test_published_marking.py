"""Durable events a commit published are marked so, in batches (shared/turns/events.py, _PublishedMarker)."""
from __future__ import annotations

import time

from sqlalchemy import select

from shared.auth.principal import SYSTEM, Principal
from shared.db import unit_of_work
from shared.engine.step import run_step
from shared.models import AgentSession, StreamEvent
from shared.runtime import Runtime
from shared.turns import service as turns


def _unmarked(rt: Runtime, session_ids: list[str]) -> int:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        rows = db.scalars(select(StreamEvent).where(StreamEvent.session_id.in_(session_ids))).all()
        assert rows, "the steps wrote no durable events"
        return sum(1 for r in rows if r.published_at is None)


def test_published_events_are_marked_and_the_cursor_floor_raised(rt: Runtime, who: Principal) -> None:
    sessions = []
    for text in ("hello", "hello again"):  # two sessions' commits, marked by the same process's marker
        with unit_of_work(rt.sessions, who) as db:
            session = turns.create_session(db, rt, who, "echo", None)
            turn, _ = turns.create_turn(db, rt, who, session.id, text)
        assert run_step(rt, turn.id, 0) == "completed"
        sessions.append(session.id)
    deadline = time.monotonic() + 10
    while _unmarked(rt, sessions) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _unmarked(rt, sessions) == 0
    with unit_of_work(rt.sessions, SYSTEM) as db:
        for sid in sessions:
            floor = db.get(AgentSession, sid).event_cursor
            assert floor and floor >= rt.events.head(sid)  # no cursor the log issued is above the floor
