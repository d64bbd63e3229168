"""The scheduler's recovery sweep and attempt accounting, on the real Postgres and Redis broker queue.

- a step nobody claimed whose task is gone from the broker's queue (the worker that took it was
  killed before claiming it) is re-sent after STEPRUN_UNCLAIMED_TASK_SECONDS, not the longer
  STEPRUN_LOST_TASK_SECONDS; one still waiting in the queue is never sent twice;
- STEPRUN_MAX_ATTEMPTS counts attempts that died or failed, not hand-backs.
"""
from __future__ import annotations

import copy
import secrets
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from shared.agent import Agent, AgentRegistry
from shared.auth.principal import SYSTEM, Principal
from shared.clock import utcnow
from shared.db import unit_of_work
from shared.engine.claim import claim_turn
from shared.engine.commit import release_step
from shared.engine.step import run_step
from shared.llm import TransientModelError
from shared.models import Turn
from shared.queue import CeleryQueue
from shared.runtime import Runtime
from shared.turns import service as turns
from shared.turns.recovery import recover_expired_leases, recover_lost_tasks


class FlakyProvider:
    """A model whose provider is always briefly unavailable."""

    def generate(self, messages: Any, tools: Any, on_delta: Any, max_output_tokens: Any = None) -> Any:
        raise TransientModelError("503 from the provider")


@pytest.fixture
def own(rt: Runtime) -> Iterator[Runtime]:
    """The test runtime on a broker queue of its own (no other test's tasks in it), with a flaky agent."""
    fresh = copy.copy(rt)
    fresh.settings = replace(rt.settings, queue_name=f"{rt.settings.queue_name}-sweep-{secrets.token_hex(3)}")
    fresh.queue = CeleryQueue(fresh.settings)
    fresh.agents = AgentRegistry([*rt.agents, Agent(name="flaky", model=FlakyProvider())])
    yield fresh
    with fresh.queue.app.connection_for_write() as conn:
        conn.default_channel.client.delete(fresh.settings.queue_name)
    fresh.queue.close()


def _turn(rt: Runtime, who: Principal, agent: str = "echo") -> str:
    with unit_of_work(rt.sessions, who) as db:
        session = turns.create_session(db, rt, who, agent, None)
        turn, _ = turns.create_turn(db, rt, who, session.id, "hi")
        return turn.id


def _drain(rt: Runtime) -> None:
    """What a worker killed right after taking every task does to the queue."""
    with rt.queue.app.connection_for_write() as conn:  # type: ignore[attr-defined]
        conn.default_channel.client.delete(rt.settings.queue_name)


def _queued(rt: Runtime, turn_id: str) -> list[int]:
    """The steps of ``turn_id`` whose task waits in the queue, one entry per message."""
    from shared.queue import _step_of

    with rt.queue.app.connection_for_write() as conn:  # type: ignore[attr-defined]
        raw = conn.default_channel.client.lrange(rt.settings.queue_name, 0, -1)
    return sorted(step for t, step in filter(None, map(_step_of, raw)) if t == turn_id)


def _age(rt: Runtime, turn_id: str, seconds: float) -> None:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        db.execute(update(Turn).where(Turn.id == turn_id).values(enqueued_at=utcnow() - timedelta(seconds=seconds)))


def _row(rt: Runtime, turn_id: str) -> Turn:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        turn = db.get(Turn, turn_id)
        assert turn is not None
        db.expunge(turn)
        return turn


def _lapse(rt: Runtime, turn_id: str) -> None:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        db.execute(update(Turn).where(Turn.id == turn_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_a_task_taken_by_a_worker_that_died_is_resent_after_the_short_threshold(own: Runtime, who: Principal) -> None:
    assert own.settings.unclaimed_task_seconds < own.settings.lost_task_seconds
    tid = _turn(own, who)
    assert (tid, 0) in own.queue.waiting_steps()  # type: ignore[attr-defined]
    _drain(own)  # taken, never claimed
    _age(own, tid, own.settings.unclaimed_task_seconds / 2)
    recover_lost_tasks(own)
    assert _queued(own, tid) == []  # a worker may be claiming it right now
    _age(own, tid, own.settings.unclaimed_task_seconds + 0.5)
    assert recover_lost_tasks(own) >= 1
    assert _queued(own, tid) == [0]
    assert run_step(own, tid, 0) == "completed"


def test_a_task_still_waiting_in_the_queue_is_not_sent_twice(own: Runtime, who: Principal) -> None:
    tid = _turn(own, who)
    _age(own, tid, own.settings.lost_task_seconds * 3)  # a long backlog: it waits its turn
    recover_lost_tasks(own)
    assert _queued(own, tid) == [0]
    # A task for another step of the turn is no stand-in for the current one.
    _drain(own)
    own.queue.enqueue_step(tid, 5)
    recover_lost_tasks(own)
    assert _queued(own, tid) == [0, 5]


def test_an_unreadable_queue_falls_back_to_the_lost_task_threshold(own: Runtime, who: Principal,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    tid = _turn(own, who)

    def unreadable(limit: int = 0) -> None:
        return None  # more waiting than the sweep reads

    monkeypatch.setattr(own.queue, "waiting_steps", unreadable)
    _drain(own)
    _age(own, tid, own.settings.unclaimed_task_seconds + 0.5)
    recover_lost_tasks(own)
    assert _queued(own, tid) == []
    _age(own, tid, own.settings.lost_task_seconds + 0.5)
    recover_lost_tasks(own)
    assert _queued(own, tid) == [0]


def test_the_queue_reader_gives_up_past_its_limit(own: Runtime, who: Principal) -> None:
    for step in range(3):
        own.queue.enqueue_step("tur_x", step)
    assert own.queue.waiting_steps(limit=3) == {("tur_x", 0), ("tur_x", 1), ("tur_x", 2)}  # type: ignore[attr-defined]
    assert own.queue.waiting_steps(limit=2) is None  # type: ignore[attr-defined]


def test_lapsed_leases_count_as_failed_attempts_whoever_finds_them(own: Runtime, who: Principal) -> None:
    tid = _turn(own, who)
    with unit_of_work(own.sessions, SYSTEM) as db:
        assert claim_turn(db, tid, 0, "worker-a", lease_seconds=60) is not None
    _lapse(own, tid)
    assert recover_expired_leases(own) >= 1  # the sweep finds it
    assert _row(own, tid).step_failures == 1
    with unit_of_work(own.sessions, SYSTEM) as db:
        second = claim_turn(db, tid, 0, "worker-b", lease_seconds=60)
    assert second is not None and second.step_attempt == 2 and second.step_failures == 1
    _lapse(own, tid)
    with unit_of_work(own.sessions, SYSTEM) as db:  # a redelivered task finds it first
        third = claim_turn(db, tid, 0, "worker-c", lease_seconds=60)
    assert third is not None and third.step_attempt == 3 and third.step_failures == 2
    release_step(own, third, "the worker running it shut down", failed=False)
    assert _row(own, tid).step_failures == 2
    assert run_step(own, tid, 0) == "completed"
    turn = _row(own, tid)
    assert turn.step_failures == 0 and turn.step_attempt == 0  # the next step starts afresh


def test_hand_backs_do_not_use_up_max_attempts(own: Runtime, who: Principal) -> None:
    tid = _turn(own, who)
    for _ in range(own.settings.max_attempts + 2):  # workers shutting down, one after another
        with unit_of_work(own.sessions, SYSTEM) as db:
            claim = claim_turn(db, tid, 0, "draining-worker", lease_seconds=60)
        assert claim is not None
        release_step(own, claim, "the worker running it shut down", failed=False)
    assert run_step(own, tid, 0) == "completed"
    assert _row(own, tid).status == "completed"


def test_transient_model_errors_use_up_max_attempts(own: Runtime, who: Principal) -> None:
    tid = _turn(own, who, agent="flaky")
    for _ in range(own.settings.max_attempts):
        assert run_step(own, tid, 0) == "released"
    assert run_step(own, tid, 0) == "failed"
    turn = _row(own, tid)
    assert turn.error is not None and turn.error["code"] == "max_attempts"
    assert f"failed {own.settings.max_attempts} times" in turn.error["message"]
    assert "503 from the provider" in turn.error["message"]
