"""A new turn written by Core statements (the plain POST) is the row a flush would write, and answers the same.

``create_turn`` writes the plain case (no Idempotency-Key, no interrupt, a database session holding
nothing yet) without the ORM's unit of work; the other cases keep it. Both must leave the same rows and
return a turn whose JSON is what a read of its row gives.
"""
from __future__ import annotations

from api.serialize import turn_json
from shared.auth.principal import Principal
from shared.db import unit_of_work
from shared.models import AgentSession
from shared.runtime import Runtime
from shared.turns import service as turns


def _session(rt: Runtime, who: Principal) -> str:
    with unit_of_work(rt.sessions, who) as db:
        return turns.create_session(db, rt, who, "echo", None).id


def _row(rt: Runtime, who: Principal, session_id: str) -> AgentSession:
    with unit_of_work(rt.sessions, who) as db:
        return turns.get_session(db, who, session_id)


def test_the_answered_turn_is_its_row_and_the_session_counts_it(rt: Runtime, who: Principal) -> None:
    session_id = _session(rt, who)
    with unit_of_work(rt.sessions, who) as db:
        first, created = turns.create_turn(db, rt, who, session_id, "héllo")
    assert created
    with unit_of_work(rt.sessions, who) as db:
        assert turn_json(turns.get_turn(db, who, first.id)) == turn_json(first)
    session = _row(rt, who, session_id)
    assert (session.turn_count, session.input_bytes, session.active_turn_id) == (1, len("héllo".encode()), first.id)
    assert first.seq == 1 and first.status == "queued" and first.enqueued_at is not None

    # Busy: queued behind the first, not the session's turn, and counted all the same.
    with unit_of_work(rt.sessions, who) as db:
        second, _ = turns.create_turn(db, rt, who, session_id, "again")
    with unit_of_work(rt.sessions, who) as db:
        assert turn_json(turns.get_turn(db, who, second.id)) == turn_json(second)
        assert turns.get_turn(db, who, second.id).enqueued_at is None
    session = _row(rt, who, session_id)
    assert (session.turn_count, session.active_turn_id) == (2, first.id)
    assert session.input_bytes == len("héllo".encode()) + len(b"again")


def test_a_session_already_loaded_gets_the_same_rows(rt: Runtime, who: Principal) -> None:
    """A caller that read the session first (the ORM path) leaves what the plain path leaves."""
    plain, loaded = _session(rt, who), _session(rt, who)
    with unit_of_work(rt.sessions, who) as db:
        a, _ = turns.create_turn(db, rt, who, plain, "same input")
    with unit_of_work(rt.sessions, who) as db:
        turns.get_session(db, who, loaded)
        b, _ = turns.create_turn(db, rt, who, loaded, "same input")
    skip = {"id", "session_id", "created_at"}
    with unit_of_work(rt.sessions, who) as db:
        ja, jb = (turn_json(turns.get_turn(db, who, t.id)) for t in (a, b))
    assert {k: v for k, v in ja.items() if k not in skip} == {k: v for k, v in jb.items() if k not in skip}
    ra, rb = _row(rt, who, plain), _row(rt, who, loaded)
    assert (ra.turn_count, ra.input_bytes) == (rb.turn_count, rb.input_bytes)
    assert (ra.active_turn_id, rb.active_turn_id) == (a.id, b.id)
