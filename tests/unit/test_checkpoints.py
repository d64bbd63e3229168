"""Checkpoints store what each step added, not the whole history (shared/checkpoints.py)."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from sqlalchemy import delete, event, select

from shared import checkpoints
from shared.agent import Agent, AgentRegistry
from shared.auth.principal import SYSTEM, Principal
from shared.clock import utcnow
from shared.db import unit_of_work
from shared.engine.step import build_runtime, run_step
from shared.models import Checkpoint, Message
from shared.runtime import Runtime
from shared.settings import Settings
from shared.turns import history
from shared.turns import service as turns
from shared.turns.housekeeping import prune_checkpoints

TURNS = 2 * checkpoints.KEYFRAME_EVERY + 6


@pytest.fixture
def rt(settings: Settings) -> Iterator[Runtime]:
    """A runtime serving one quick echo agent: these tests run a hundred turns."""
    quick = Agent(name="echo", instructions="Echo.", model="scripted:ttft=0,tps=100000,words=3")
    runtime = build_runtime(settings, agents=AgentRegistry([quick]))
    yield runtime
    runtime.close()


def _long_session(rt: Runtime, who: Principal, count: int) -> str:
    """A session of ``count`` one-step echo turns, each run to completion."""
    with unit_of_work(rt.sessions, who) as db:
        session_id = turns.create_session(db, rt, who, "echo", None).id
    for i in range(count):
        with unit_of_work(rt.sessions, who) as db:
            turn, _ = turns.create_turn(db, rt, who, session_id, f"message number {i} " + "x" * 200)
            turn_id = turn.id
        assert run_step(rt, turn_id, 0) == "completed"
    return session_id


def _rows(rt: Runtime, session_id: str) -> list[Checkpoint]:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        return list(db.scalars(select(Checkpoint).where(Checkpoint.session_id == session_id)
                               .order_by(Checkpoint.number)))


def _history(rt: Runtime, session_id: str) -> list[tuple[str, str]]:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        return [(m.role, m.content) for m in db.scalars(
            select(Message).where(Message.session_id == session_id).order_by(Message.id))]


def test_a_step_stores_what_it_added_and_turn_n_writes_what_turn_1_writes(rt: Runtime, who: Principal) -> None:
    session_id = _long_session(rt, who, TURNS)
    rows = _rows(rt, session_id)
    assert [r.number for r in rows] == list(range(1, TURNS + 1))
    keyframes = [r.number for r in rows if "base" not in r.state]
    # A keyframe once the chain reaches KEYFRAME_EVERY rows and holds as many messages as its keyframe.
    expected, keyframe, size, chain = [1], 1, 2, 0
    for number in range(2, TURNS + 1):
        chain += 2
        if number - keyframe >= checkpoints.KEYFRAME_EVERY and chain >= size:
            expected.append(number)
            keyframe, size, chain = number, 2 * number, 0
    assert keyframes == expected == [1, 1 + checkpoints.KEYFRAME_EVERY, 2 + 2 * checkpoints.KEYFRAME_EVERY]
    # Each keyframe holds at least twice the one before: together, at most about twice the history.
    held = sum(len(r.state["messages"]) for r in rows if "base" not in r.state)
    assert held <= 2 * 2 * TURNS, (held, 2 * TURNS)
    deltas = [r for r in rows if "base" in r.state]
    # Each delta holds its own turn's two messages (the input and the answer), however long the session.
    assert {len(r.state["messages"]) for r in deltas} == {2}
    sizes = [len(json.dumps(r.state)) for r in deltas]
    assert max(sizes) - min(sizes) < 16, sizes  # only the digits of the numbers differ
    # Stored bytes grow with the history, not with its square: far under one whole history per step.
    whole = len(json.dumps({"messages": _history_as_messages(rt, session_id)}))
    stored = sum(len(json.dumps(r.state)) for r in rows)
    full_copies = sum(len(json.dumps({"messages": _history_as_messages(rt, session_id)[:2 * r.number]}))
                      for r in rows)
    print(f"\n{TURNS} turns: checkpoints store {stored} bytes; whole copies at every step would be {full_copies}")
    assert stored < 4 * whole, (stored, whole)


def _history_as_messages(rt: Runtime, session_id: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in _history(rt, session_id)]


def test_every_checkpoint_reads_whole_and_the_next_step_sees_all_of_it(rt: Runtime, who: Principal) -> None:
    session_id = _long_session(rt, who, checkpoints.KEYFRAME_EVERY + 3)
    expected = _history(rt, session_id)
    with unit_of_work(rt.sessions, who) as db:
        for row in db.scalars(select(Checkpoint).where(Checkpoint.session_id == session_id)):
            whole = checkpoints.messages(db, row)
            assert [(m["role"], m["content"]) for m in whole] == expected[:2 * row.number]
        export = history.export_session(db, who, session_id)
    assert export.checkpoint_messages is not None
    assert [(m["role"], m["content"]) for m in export.checkpoint_messages] == expected


def test_pruning_keeps_each_kept_checkpoint_readable(rt: Runtime, who: Principal) -> None:
    session_id = _long_session(rt, who, checkpoints.KEYFRAME_EVERY + 8)
    rt.settings = rt.settings.replace(checkpoint_keep=3)
    assert prune_checkpoints(rt) > 0
    rows = _rows(rt, session_id)
    latest = rows[-1].number
    # The three newest are kept, and the rows back to their keyframe, nothing older.
    assert rows[0].number == checkpoints.keyframe_of(latest - 2, rows[-3].state)
    assert rows[0].number <= latest - 2 and "base" not in rows[0].state
    with unit_of_work(rt.sessions, who) as db:
        whole = checkpoints.messages(db, db.get(Checkpoint, rows[-1].id))
    assert [(m["role"], m["content"]) for m in whole] == _history(rt, session_id)
    # And the session goes on from it.
    with unit_of_work(rt.sessions, who) as db:
        turn, _ = turns.create_turn(db, rt, who, session_id, "one more")
        turn_id = turn.id
    assert run_step(rt, turn_id, 0) == "completed"
    assert _history(rt, session_id)[-1][1].startswith("You said: one more")


def _checkpoint_reads(rt: Runtime) -> list[str]:
    """Captures the statements that read checkpoint rows whole (their messages), from now on."""
    seen: list[str] = []

    def before(conn, cursor, statement, params, context, executemany) -> None:  # noqa: ANN001
        head = re.split(r"\s+FROM\s+", statement.replace('"', ""), maxsplit=1)[0]
        if head.lstrip().upper().startswith("SELECT") and re.search(r"checkpoints\.state\s*(,|$|AS )", head):
            seen.append(statement)  # the state column itself (not a path into it, as the keyframe number)
    for engine in {rt.engine, rt.app_engine} - {None}:
        event.listen(engine, "before_cursor_execute", before)
    return seen


def _one_turn(rt: Runtime, who: Principal, session_id: str, text: str) -> None:
    with unit_of_work(rt.sessions, who) as db:
        turn_id = turns.create_turn(db, rt, who, session_id, text)[0].id
    assert run_step(rt, turn_id, 0) == "completed"


def test_a_step_after_this_process_wrote_the_checkpoint_reads_no_history(rt: Runtime, who: Principal) -> None:
    session_id = _long_session(rt, who, 3)
    reads = _checkpoint_reads(rt)
    hits = rt.history_cache.hits
    _one_turn(rt, who, session_id, "what did I say?")
    assert rt.history_cache.hits == hits + 1
    assert reads == []  # the latest checkpoint's id only, not the chain
    # What the step saw as the history is what is stored: its checkpoint continues the chain unbroken.
    with unit_of_work(rt.sessions, who) as db:
        _, whole = checkpoints.load(db, session_id)
    assert [(m["role"], m["content"]) for m in whole] == _history(rt, session_id)


def test_a_step_reads_only_the_checkpoints_written_since_the_one_its_process_holds(
        settings: Settings, rt: Runtime, who: Principal) -> None:
    session_id = _long_session(rt, who, 2)
    other = build_runtime(settings, agents=rt.agents)  # another worker process
    try:
        _one_turn(other, who, session_id, "from the other worker")
    finally:
        other.close()
    reads = _checkpoint_reads(rt)
    partial = rt.history_cache.partial_hits
    _one_turn(rt, who, session_id, "and back here")  # it holds checkpoint 2; the latest is 3
    assert rt.history_cache.partial_hits == partial + 1
    assert len(reads) == 1 and "checkpoints.number >=" in reads[0]  # checkpoints 2 and 3, not the chain
    assert [c for _, c in _history(rt, session_id)][-4] == "from the other worker"
    with unit_of_work(rt.sessions, who) as db:
        _, whole = checkpoints.load(db, session_id)
    assert [(m["role"], m["content"]) for m in whole] == _history(rt, session_id)


def test_a_deleted_checkpoint_is_not_served_from_the_cache_even_when_its_number_is_reused(
        settings: Settings, rt: Runtime, who: Principal) -> None:
    session_id = _long_session(rt, who, 3)  # rt holds checkpoint 3
    with unit_of_work(rt.sessions, SYSTEM) as db:  # as a rollback deletes its turn's checkpoint and messages
        latest = db.scalars(select(Checkpoint).where(Checkpoint.session_id == session_id)
                            .order_by(Checkpoint.number.desc()).limit(1)).one()
        db.execute(delete(Message).where(Message.turn_id == latest.turn_id))
        db.delete(latest)
    other = build_runtime(settings, agents=rt.agents)
    try:
        _one_turn(other, who, session_id, "a new third turn")  # a new checkpoint 3
    finally:
        other.close()
    misses = rt.history_cache.misses
    _one_turn(rt, who, session_id, "after the rollback")
    assert rt.history_cache.misses == misses + 1
    with unit_of_work(rt.sessions, who) as db:
        _, whole = checkpoints.load(db, session_id)
    assert [(m["role"], m["content"]) for m in whole] == _history(rt, session_id)
    assert len(whole) == 2 * 4 and whole[4]["content"] == "a new third turn"


def test_the_cache_holds_at_most_its_messages() -> None:
    cache = checkpoints.HistoryCache(max_messages=10)
    at = utcnow()
    cache.put("a", at, 1, [{"n": i} for i in range(6)])
    cache.put("b", at, 1, [{"n": i} for i in range(6)])  # 12 > 10: the least recently used goes
    assert cache.get("a") is None and cache.get("b") is not None
    cache.put("c", at, 1, [{"n": i} for i in range(11)])  # larger than the whole cache: not kept
    assert cache.get("c") is None and cache.get("b") is not None
    empty = checkpoints.HistoryCache(0)
    empty.put("a", at, 1, [{"n": 0}])
    assert empty.get("a") is None
