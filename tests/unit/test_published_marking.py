"""Durable events a commit published are marked so, in batches (shared/turns/events.py, _PublishedMarker)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import delete, select

from shared.auth.principal import SYSTEM, Principal
from shared.db import unit_of_work
from shared.engine.step import run_step
from shared.models import AgentSession, StreamEvent
from shared.runtime import Runtime
from shared.turns import events
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


def test_marking_takes_the_session_before_its_events_as_a_rollback_does(rt: Runtime, who: Principal) -> None:
    """A rollback locks its session, then deletes its turn's events; the marker must not hold those events'
    rows while it waits for the session's (the two deadlocked, and Postgres failed one: a 503)."""
    with unit_of_work(rt.sessions, who) as db:
        session = turns.create_session(db, rt, who, "echo", None)
        turn, _ = turns.create_turn(db, rt, who, session.id, "hello")
    assert run_step(rt, turn.id, 0) == "completed"
    with unit_of_work(rt.sessions, SYSTEM) as db:
        ids = list(db.scalars(select(StreamEvent.id).where(StreamEvent.session_id == session.id)))
        floor = db.get(AgentSession, session.id).event_cursor + 1
    assert ids
    failures: list[BaseException] = []

    def marker() -> None:
        try:
            with unit_of_work(rt.sessions, SYSTEM) as db:
                events.mark(db, ids, {session.id: floor})
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    with unit_of_work(rt.sessions, who) as db:  # the rollback's transaction
        db.scalars(select(AgentSession).where(AgentSession.id == session.id).with_for_update()).one()
        thread = threading.Thread(target=marker)
        thread.start()
        time.sleep(0.5)  # the marker is now waiting for a lock
        db.execute(delete(StreamEvent).where(StreamEvent.session_id == session.id))
    thread.join(30)
    assert not thread.is_alive()
    assert not failures, failures
    with unit_of_work(rt.sessions, SYSTEM) as db:
        # Raised at least to it (the step's own batched marking may have raised it further meanwhile).
        assert db.get(AgentSession, session.id).event_cursor >= floor


def test_marking_runs_on_the_embedded_database_too() -> None:
    """The marker's statements differ per dialect (an array on Postgres, an IN list elsewhere): SQLite, the
    embedded default, marks only the ids given and raises the floor only upwards."""
    from sqlalchemy import create_engine, insert
    from sqlalchemy.orm import Session

    from shared.models import table_of

    engine = create_engine("sqlite://")
    sessions_t, events_t = table_of(AgentSession), table_of(StreamEvent)
    sessions_t.metadata.create_all(engine)
    owner = {"tenant_id": "t", "user_id": "u"}
    with Session(engine) as db:
        db.connection().execute(insert(sessions_t).values(id="s1", agent="echo", event_cursor=5, **owner))
        db.connection().execute(insert(events_t), [{"id": f"e{i}", "session_id": "s1", "type": "step.completed",
                                                    "body": "{}", **owner} for i in range(3)])
        db.commit()
        events.mark(db, ["e0", "e2"], {"s1": 9})
        db.commit()
        assert {e.id for e in db.scalars(select(StreamEvent).where(StreamEvent.published_at.is_not(None)))} == \
            {"e0", "e2"}
        events.mark(db, ["e1"], {"s1": 7})  # a lower cursor leaves the floor where it is
        db.commit()
        assert db.get(AgentSession, "s1").event_cursor == 9
        assert db.scalar(select(StreamEvent.id).where(StreamEvent.published_at.is_(None))) is None


def test_a_system_transaction_soon_after_marks_what_was_published_and_gives_it_back_on_rollback(
        runtimes: Callable[..., Runtime], who: Principal, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step's claim marks what its process published and has not marked yet, in its own transaction (the
    next step of a tool turn saves the marker's): held ahead of its first statement, undone with it on a
    rollback and handed back to the marker, so a later transaction marks them."""
    monkeypatch.setattr(events, "MARK_BATCH_SECONDS", 5.0)  # the marker's own transaction comes later than this
    rt = runtimes()
    with unit_of_work(rt.sessions, who) as db:
        session = turns.create_session(db, rt, who, "echo", None)
        turn, _ = turns.create_turn(db, rt, who, session.id, "hello")
    assert run_step(rt, turn.id, 0) == "completed"
    unmarked = _unmarked(rt, [session.id])
    assert unmarked > 0
    with pytest.raises(RuntimeError), events.system_work_marking_published(rt) as db:
        db.execute(select(1))  # the marks went ahead of it
        raise RuntimeError("the claim failed")
    assert _unmarked(rt, [session.id]) == unmarked
    with events.system_work_marking_published(rt) as db:
        db.execute(select(1))
    assert _unmarked(rt, [session.id]) == 0
    with unit_of_work(rt.sessions, SYSTEM) as db:
        assert db.get(AgentSession, session.id).event_cursor >= rt.events.head(session.id)
