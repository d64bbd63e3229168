"""Fair share: a user (or tenant) at its running cap has its next turns deferred, unclaimed, then woken in order."""
from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

from shared.auth.principal import SYSTEM, Principal
from shared.db import unit_of_work
from shared.engine.claim import claim_and_load
from shared.engine.step import run_step
from shared.models import Turn
from shared.runtime import Runtime
from shared.turns import fairshare
from shared.turns import service as turns
from shared.turns.recovery import sweep
from tests.support.turns import start_turn


class RecordingQueue:
    """Stands in for the broker: the test runs each sent step itself."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def enqueue_step(self, turn_id: str, step: int) -> None:
        self.sent.append((turn_id, step))

    def close(self) -> None:
        pass


@pytest.fixture
def capped(runtimes: Callable[..., Runtime]) -> Callable[..., tuple[Runtime, RecordingQueue]]:
    def make(**caps: Any) -> tuple[Runtime, RecordingQueue]:
        rt = runtimes(**caps)
        rt.queue.close()
        rt.queue = RecordingQueue()
        return rt, rt.queue
    return make


def _start(rt: Runtime, who: Principal, agent: str = "math", text: str = "add 2 and 40") -> tuple[str, str]:
    return start_turn(rt, who, agent, text)


def _turn(rt: Runtime, turn_id: str) -> Turn:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        turn = db.get(Turn, turn_id)
        assert turn is not None
        return turn


def test_a_user_at_the_cap_waits_without_an_attempt_and_starts_when_a_slot_frees(capped: Any) -> None:
    rt, queue = capped(max_running_turns_per_user=2)
    tenant = f"t-{secrets.token_hex(4)}"
    hog, other = Principal(tenant, "hog"), Principal(tenant, f"u-{secrets.token_hex(4)}")
    hog_turns = [_start(rt, hog)[1] for _ in range(4)]
    assert run_step(rt, hog_turns[0], 0) == "in_progress"
    assert run_step(rt, hog_turns[1], 0) == "in_progress"
    for _ in range(3):  # a redelivered task is deferred again, never claimed, never an attempt
        assert run_step(rt, hog_turns[2], 0) == "deferred"
    assert run_step(rt, hog_turns[3], 0) == "deferred"
    deferred = _turn(rt, hog_turns[2])
    assert (deferred.status, deferred.attempt, deferred.enqueued_at) == ("queued", 0, None)
    # Nobody else waits for the hog: another user of the tenant runs at once.
    assert run_step(rt, _start(rt, other)[1], 0) == "in_progress"
    # Nothing is re-sent while the hog stays at its cap (no busy loop), not even by the sweep.
    queue.sent.clear()
    sweep(rt)  # (it may re-send other tests' leftover turns: only the hog's matter here)
    assert [s for s in queue.sent if s[0] in hog_turns] == []
    queue.sent.clear()  # the sweep's re-sends of other tests' leftovers are not this test's
    # The hog's first turn ends: its oldest deferred turn is sent (and only that one), and runs.
    assert run_step(rt, hog_turns[0], 1) == "completed"
    assert queue.sent == [(hog_turns[2], 0)]
    assert run_step(rt, hog_turns[2], 0) == "in_progress"
    assert run_step(rt, hog_turns[3], 0) == "deferred"
    assert run_step(rt, hog_turns[2], 1) == "completed"
    assert queue.sent[-1] == (hog_turns[3], 0)
    assert run_step(rt, hog_turns[3], 0) == "in_progress"
    assert _turn(rt, hog_turns[3]).attempt == 1


def test_the_tenant_cap_defers_every_user_of_the_tenant_and_wakes_the_oldest(capped: Any) -> None:
    rt, queue = capped(max_running_turns_per_user=0, max_running_turns_per_tenant=2)
    tenant = f"t-{secrets.token_hex(4)}"
    a, b, c = (Principal(tenant, f"u{i}") for i in range(3))
    first, second = _start(rt, a)[1], _start(rt, b)[1]
    third, fourth = _start(rt, c)[1], _start(rt, a)[1]
    elsewhere = _start(rt, Principal(f"t-{secrets.token_hex(4)}", "u0"))[1]
    assert run_step(rt, first, 0) == "in_progress"
    assert run_step(rt, second, 0) == "in_progress"
    assert run_step(rt, third, 0) == "deferred"
    assert run_step(rt, fourth, 0) == "deferred"
    assert run_step(rt, elsewhere, 0) == "in_progress"  # another tenant is not held back
    queue.sent.clear()
    assert run_step(rt, second, 1) == "completed"  # b's turn frees the slot: c's (older) turn takes it
    deadline = time.monotonic() + 10  # woken on the system path by a thread, right after the commit
    while not queue.sent and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert queue.sent == [(third, 0)]


def test_a_slot_freed_without_a_finish_is_found_by_the_sweep(capped: Any) -> None:
    rt, queue = capped(max_running_turns_per_user=1)
    who = Principal(f"t-{secrets.token_hex(4)}", "u")
    (running_session, running), (_, waiting) = _start(rt, who), _start(rt, who)
    assert run_step(rt, running, 0) == "in_progress"
    assert run_step(rt, waiting, 0) == "deferred"
    with unit_of_work(rt.sessions, who) as db:  # the running turn's session deleted mid-turn
        turns.delete_session(db, rt, who, running_session)
    queue.sent.clear()
    report = sweep(rt)
    assert report.deferred_woken >= 1 and (waiting, 0) in queue.sent
    assert run_step(rt, waiting, 0) == "in_progress"


def test_a_pause_frees_the_slot(capped: Any) -> None:
    rt, queue = capped(max_running_turns_per_user=1)
    who = Principal(f"t-{secrets.token_hex(4)}", "u")
    paused = _start(rt, who, "bank", "transfer 25 to bob")[1]
    waiting = _start(rt, who)[1]
    assert run_step(rt, paused, 0) == "requires_action"
    assert run_step(rt, waiting, 0) == "in_progress"  # the paused turn holds no slot
    third = _start(rt, who)[1]
    assert run_step(rt, third, 0) == "deferred"


def test_no_cap_no_deferral(capped: Any) -> None:
    rt, _ = capped(max_running_turns_per_user=0, max_running_turns_per_tenant=0)
    who = Principal(f"t-{secrets.token_hex(4)}", "u")
    assert all(run_step(rt, _start(rt, who)[1], 0) == "in_progress" for _ in range(6))


def test_a_freeing_transaction_never_waits_for_a_claims_lock(capped: Any) -> None:
    """A turn ending (its rows locked) while a claim of the same user holds the fair-share lock and waits for
    those rows: the ending transaction must not wait for the lock too, or the two deadlock. It hands the
    wake-up to after its commit instead."""
    rt, _ = capped(max_running_turns_per_user=2)
    who = Principal(f"t-{secrets.token_hex(4)}", "u")
    claim = rt.sessions()
    try:
        claim.execute(text("SELECT 1"))
        assert fairshare._lock(claim, rt.settings, who.tenant_id, who.user_id)
        claim.execute(text("SELECT 1"))  # the lock goes ahead of the claim's next statement: held from here
        with unit_of_work(rt.sessions, SYSTEM) as ending:
            ending.execute(text("SET LOCAL lock_timeout = '2s'"))  # waiting for the lock would fail here
            started = time.monotonic()
            fairshare.slot_freed(ending, rt, who.tenant_id, who.user_id)
            assert time.monotonic() - started < 1.0
    finally:
        claim.rollback()
        claim.close()


@pytest.mark.parametrize("caps", [{"max_running_turns_per_user": 2},
                                  {"max_running_turns_per_user": 2, "max_running_turns_per_tenant": 5}],
                         ids=["user", "tenant"])
def test_the_admission_names_from_the_turn_row_the_lock_every_other_taker_names(caps: dict[str, int],
                                                                                  capped: Any) -> None:
    """The admission takes its owner's lock by a name built in SQL from the turn's row (no read of the row
    first); the wake-up and the turn's end build it in Python. They must be one lock: while a wake-up holds
    it, the admission of that user's turn waits."""
    rt, _ = capped(**caps)
    who = Principal(f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}")
    _, turn_id = _start(rt, who)
    holder = rt.sessions()
    try:
        holder.execute(text("SELECT 1"))
        assert fairshare._lock(holder, rt.settings, who.tenant_id, who.user_id)
        holder.execute(text("SELECT 1"))  # sent with this statement: held from here
        with pytest.raises(Exception, match="lock timeout"):
            with unit_of_work(rt.sessions, SYSTEM) as admitting:
                admitting.execute(text("SET LOCAL lock_timeout = '300ms'"))
                assert fairshare.first_claim(admitting, rt.settings, turn_id, 0) is not None
                admitting.execute(text("SELECT 1"))  # the lock goes ahead of this statement: it waits
    finally:
        holder.rollback()
        holder.close()
    with unit_of_work(rt.sessions, SYSTEM) as admitting:  # and once it is free, the turn is claimed
        first = fairshare.first_claim(admitting, rt.settings, turn_id, 0)
        claim, _ = claim_and_load(admitting, turn_id, 0, "w-test", 30.0, 0, first=first)
        assert claim is not None


def test_a_first_claim_that_counted_a_turn_since_ended_claims_again(capped: Any, monkeypatch: Any) -> None:
    """The first claim counts its owner's running turns in its own UPDATE, from that statement's snapshot.
    A running turn that ends after the snapshot (its end cannot wait for the claim's lock) is still counted
    there: the claim claims nothing, and the read after it, which sees the end, must not leave the turn
    queued with its task spent. It claims again."""
    from shared.engine.step import claim_step

    rt, _ = capped(max_running_turns_per_user=1)
    who = Principal(f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}")
    running, waiting = _start(rt, who)[1], _start(rt, who)[1]
    assert run_step(rt, running, 0) == "in_progress"
    asked = fairshare.defer_over_cap

    def running_turn_ends_first(db: Any, settings: Any, turn_id: str) -> bool | None:
        with unit_of_work(rt.sessions, SYSTEM) as ending:  # between the claim's UPDATE and this read
            ending.execute(text("UPDATE turns SET status = 'completed', lease_expires_at = NULL WHERE id = :id"),
                           {"id": running})
        return asked(db, settings, turn_id)

    monkeypatch.setattr(fairshare, "defer_over_cap", running_turn_ends_first)
    deferred, claim, _, _ = claim_step(rt, waiting, 0)
    assert not deferred and claim is not None and claim.turn_id == waiting
    assert _turn(rt, waiting).status == "in_progress"


def test_a_first_claim_over_the_cap_is_deferred_by_the_read_after_it(capped: Any) -> None:
    from shared.engine.step import claim_step

    rt, _ = capped(max_running_turns_per_user=1)
    who = Principal(f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}")
    running, waiting = _start(rt, who)[1], _start(rt, who)[1]
    assert run_step(rt, running, 0) == "in_progress"
    deferred, claim, _, _ = claim_step(rt, waiting, 0)
    assert deferred and claim is None
    turn = _turn(rt, waiting)
    assert (turn.status, turn.attempt, turn.enqueued_at) == ("queued", 0, None)
