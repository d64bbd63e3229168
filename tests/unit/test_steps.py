"""The step engine called directly (no Celery): claims, fencing, duplicates."""
from __future__ import annotations

import json
import time
from datetime import timedelta

from sqlalchemy import select, update

from shared import checkpoints
from shared.auth.principal import SYSTEM, Principal
from shared.clock import utcnow
from shared.db import unit_of_work
from shared.engine.buffer import STATUS_HOLD_SECONDS, StepEvents
from shared.engine.claim import Claim, claim_turn
from shared.engine.commit import commit_step
from shared.engine.outcome import StepResult
from shared.engine.step import run_step
from shared.models import AgentSession, Checkpoint, Message, StreamEvent, Turn, WebhookEvent
from shared.runtime import Runtime
from shared.turns import service as turns


def _start_turn(rt: Runtime, who: Principal, agent: str, text: str) -> tuple[str, str]:
    with unit_of_work(rt.sessions, who) as db:
        session = turns.create_session(db, rt, who, agent, None)
        turn, _ = turns.create_turn(db, rt, who, session.id, text)
        return session.id, turn.id


def _claimed_echo_turn(rt: Runtime, who: Principal) -> tuple[str, str, Claim]:
    """(session id, turn id, the claim of its first step) of a new "echo" turn, claimed by worker-a."""
    with unit_of_work(rt.sessions, who) as db:
        session = turns.create_session(db, rt, who, "echo", None)
        turn, _ = turns.create_turn(db, rt, who, session.id, "hi")
    with unit_of_work(rt.sessions, SYSTEM) as db:
        claim = claim_turn(db, turn.id, 0, "worker-a", lease_seconds=60)
    assert claim is not None
    return session.id, turn.id, claim


def _messages(rt: Runtime, session_id: str) -> list[tuple[str, str]]:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        rows = db.scalars(select(Message).where(Message.session_id == session_id).order_by(Message.id))
        return [(m.role, m.content) for m in rows]


def test_a_turn_runs_step_by_step_to_completion(rt: Runtime, who: Principal) -> None:
    sid, tid = _start_turn(rt, who, "math", "add 2 and 40")
    assert run_step(rt, tid, 0) == "in_progress"
    assert run_step(rt, tid, 1) == "completed"
    with unit_of_work(rt.sessions, SYSTEM) as db:
        turn = db.get(Turn, tid)
        assert turn.status == "completed" and turn.output == "The result of add is 42." and turn.step_count == 2
        numbers = db.scalars(select(Checkpoint.number).where(Checkpoint.session_id == sid)).all()
        assert sorted(numbers) == [1, 2]
        last = db.scalars(select(Checkpoint).where(Checkpoint.session_id == sid, Checkpoint.number == 2)).one()
        assert [m["role"] for m in checkpoints.messages(db, last)] == ["user", "assistant", "tool", "assistant"]
        assert [m["role"] for m in last.state["messages"]] == ["assistant"]  # what step 1 added, on step 0's
    assert _messages(rt, sid)[-1] == ("assistant", "The result of add is 42.")


def test_duplicate_and_stale_deliveries_are_harmless(rt: Runtime, who: Principal) -> None:
    sid, tid = _start_turn(rt, who, "math", "add 1 and 1")
    assert run_step(rt, tid, 0) == "in_progress"
    assert run_step(rt, tid, 0) == "skipped"  # step 0 was committed: a redelivery does nothing
    assert run_step(rt, tid, 5) == "skipped"  # a step that is not due
    assert run_step(rt, tid, 1) == "completed"
    assert run_step(rt, tid, 1) == "skipped"  # the turn is finished
    assert [r for r, _ in _messages(rt, sid)] == ["user", "assistant", "tool", "assistant"]


def test_live_lease_blocks_a_second_claim(rt: Runtime, who: Principal) -> None:
    _, tid = _start_turn(rt, who, "echo", "hello")
    with unit_of_work(rt.sessions, SYSTEM) as db:
        first = claim_turn(db, tid, 0, "worker-a", lease_seconds=60)
    with unit_of_work(rt.sessions, SYSTEM) as db:
        second = claim_turn(db, tid, 0, "worker-b", lease_seconds=60)
    assert first is not None and first.attempt == 1 and first.step_attempt == 1
    assert second is None


def test_a_zombie_attempt_commits_nothing(rt: Runtime, who: Principal) -> None:
    sid, tid = _start_turn(rt, who, "echo", "hello")
    with unit_of_work(rt.sessions, SYSTEM) as db:
        zombie = claim_turn(db, tid, 0, "worker-a", lease_seconds=60)
        assert zombie is not None
    # Worker A stalls past its lease; worker B takes over.
    with unit_of_work(rt.sessions, SYSTEM) as db:
        db.execute(update(Turn).where(Turn.id == tid).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with unit_of_work(rt.sessions, SYSTEM) as db:
        taker = claim_turn(db, tid, 0, "worker-b", lease_seconds=60)
    assert taker is not None and taker.attempt == zombie.attempt + 1 and taker.step_attempt == 2

    stale = StepResult(text="stale", status="completed",
                       new_messages=[{"role": "assistant", "content": "from the zombie"}])
    assert commit_step(rt, zombie, stale, [], StepEvents(rt, zombie)) == "zombie"
    with unit_of_work(rt.sessions, SYSTEM) as db:
        turn = db.get(Turn, tid)
        assert turn.status == "in_progress" and turn.output == "" and turn.step_count == 0
    assert _messages(rt, sid) == []

    fresh = StepResult(text="fresh", status="completed", new_messages=[{"role": "assistant", "content": "fresh"}])
    assert commit_step(rt, taker, fresh, [], StepEvents(rt, taker)) == "completed"
    assert _messages(rt, sid) == [("assistant", "fresh")]


def test_a_retried_step_says_so_in_the_events(rt: Runtime, who: Principal) -> None:
    sid, tid = _start_turn(rt, who, "echo", "hi")
    with unit_of_work(rt.sessions, SYSTEM) as db:
        assert claim_turn(db, tid, 0, "dead-worker", lease_seconds=60) is not None
        db.execute(update(Turn).where(Turn.id == tid).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert run_step(rt, tid, 0) == "completed"
    events = rt.events.read(sid, 0).events
    import json

    types = [json.loads(e)["type"] for e in events]
    assert "step.retrying" in types and "turn.started" not in types[types.index("step.retrying"):]
    retry = json.loads(events[types.index("step.retrying")])
    assert retry["data"]["attempt"] == 2 and retry["data"]["step"] == 0


def test_max_attempts_fails_the_turn_with_a_reason(rt: Runtime, who: Principal) -> None:
    _, tid = _start_turn(rt, who, "echo", "hi")
    for _ in range(rt.settings.max_attempts):
        with unit_of_work(rt.sessions, SYSTEM) as db:
            assert claim_turn(db, tid, 0, "dying-worker", lease_seconds=60) is not None
            db.execute(update(Turn).where(Turn.id == tid).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert run_step(rt, tid, 0) == "failed"
    with unit_of_work(rt.sessions, SYSTEM) as db:
        turn = db.get(Turn, tid)
        assert turn.status == "failed" and turn.error["code"] == "max_attempts"
        assert f"failed {rt.settings.max_attempts} times" in turn.error["message"]


def test_a_commit_repeated_after_it_landed_changes_nothing(rt: Runtime, who: Principal) -> None:
    """A commit retried after a dropped connection, when the first one did reach the database."""
    session_id, turn_id, claim = _claimed_echo_turn(rt, who)
    result = StepResult(text="once", status="completed", new_messages=[{"role": "assistant", "content": "once"}])
    assert commit_step(rt, claim, result, [], StepEvents(rt, claim)) == "completed"
    assert commit_step(rt, claim, result, [], StepEvents(rt, claim)) == "zombie"
    with unit_of_work(rt.sessions, who) as db:
        assert [m.content for m in turns.list_messages(db, who, session_id, 10, 0)[0]] == ["once"]
        assert turns.get_turn(db, who, turn_id).output == "once"



def test_a_cancel_requested_while_the_step_ran_ends_the_turn_at_its_commit(rt: Runtime, who: Principal) -> None:
    """The step asked for another, but a cancel came while it ran: its commit ends the turn instead."""
    session_id, turn_id, claim = _claimed_echo_turn(rt, who)
    with unit_of_work(rt.sessions, SYSTEM) as db:
        sent = db.get(Turn, turn_id).enqueued_at
    with unit_of_work(rt.sessions, who) as db:  # the API's cancel of a running step: the flag only
        db.execute(update(Turn).where(Turn.id == turn_id).values(cancel_requested=True))
    result = StepResult(text="so far", new_messages=[{"role": "assistant", "content": "so far"}])
    assert commit_step(rt, claim, result, [], StepEvents(rt, claim)) == "cancelled"
    with unit_of_work(rt.sessions, SYSTEM) as db:
        ended = db.get(Turn, turn_id)
        assert ended.status == "cancelled" and ended.finished_at is not None and ended.step_count == 1
        assert ended.enqueued_at == sent  # no next step was sent
        assert ended.output == "so far" and ended.usage["steps"] == 1
        assert db.get(AgentSession, session_id).active_turn_id is None
        types = db.scalars(select(StreamEvent.type).where(StreamEvent.turn_id == turn_id)
                           .order_by(StreamEvent.created_at, StreamEvent.id)).all()
        assert types == ["step.completed", "turn.cancelled"]
        assert db.scalars(select(WebhookEvent.type).where(WebhookEvent.turn_id == turn_id)).all() == [
            "response.cancelled"]


def test_a_turn_ending_hands_the_session_to_the_next_queued_turn(rt: Runtime, who: Principal) -> None:
    sid, first = _start_turn(rt, who, "echo", "one")
    with unit_of_work(rt.sessions, who) as db:
        second, _ = turns.create_turn(db, rt, who, sid, "two")  # queued behind the first
        third, _ = turns.create_turn(db, rt, who, sid, "three")
        second_id, third_id = second.id, third.id
    assert run_step(rt, first, 0) == "completed"
    with unit_of_work(rt.sessions, SYSTEM) as db:
        assert db.get(AgentSession, sid).active_turn_id == second_id  # the oldest queued turn
        assert db.get(Turn, second_id).enqueued_at is not None and db.get(Turn, third_id).status == "queued"
    assert run_step(rt, second_id, 0) == "completed"
    assert run_step(rt, third_id, 0) == "completed"
    with unit_of_work(rt.sessions, SYSTEM) as db:
        assert db.get(AgentSession, sid).active_turn_id is None
        usage = db.get(Turn, third_id).usage
        assert usage["steps"] == 1 and usage["input_tokens"] > 0
    assert [c for _, c in _messages(rt, sid) if not c.startswith("You said")] == ["one", "two", "three"]


def test_a_rolled_back_turn_is_deleted_and_its_running_step_commits_nothing(rt: Runtime, who: Principal) -> None:
    sid, first = _start_turn(rt, who, "math", "add 1 and 2")
    assert run_step(rt, first, 0) == "in_progress"  # a committed step: messages and a checkpoint
    with unit_of_work(rt.sessions, SYSTEM) as db:
        running = claim_turn(db, first, 1, "worker-a", lease_seconds=60)
        assert running is not None  # step 1 is running, its lease live
    with unit_of_work(rt.sessions, who) as db:
        queued, _ = turns.create_turn(db, rt, who, sid, "add 3 and 4")  # waits behind it
        queued_id = queued.id
    with unit_of_work(rt.sessions, who) as db:
        assert turns.rollback_session(db, rt, who, sid, "test") == [queued_id, first]
        nxt, _ = turns.create_turn(db, rt, who, sid, "add 5 and 6")
        nxt_id = nxt.id
    late = StepResult(text="late", status="completed",
                      new_messages=[{"role": "assistant", "content": "late"}])
    assert commit_step(rt, running, late, [], StepEvents(rt, running)) == "zombie"
    with unit_of_work(rt.sessions, SYSTEM) as db:
        assert db.get(Turn, first) is None and db.get(Turn, queued_id) is None
        assert db.scalars(select(Checkpoint).where(Checkpoint.session_id == sid)).all() == []
        session = db.get(AgentSession, sid)
        assert session is not None and session.active_turn_id == nxt_id  # the new turn took the session
    assert _messages(rt, sid) == []
    assert run_step(rt, nxt_id, 0) == "in_progress" and run_step(rt, nxt_id, 1) == "completed"
    assert _messages(rt, sid)[0] == ("user", "add 5 and 6")


def test_rolling_back_a_finished_turn_leaves_it(rt: Runtime, who: Principal) -> None:
    sid, tid = _start_turn(rt, who, "echo", "hello")
    assert run_step(rt, tid, 0) == "completed"
    with unit_of_work(rt.sessions, who) as db:
        assert turns.rollback_turn(db, rt, who, tid) is False
    assert _messages(rt, sid)[0] == ("user", "hello")


def test_after_commit_work_waits_for_the_outer_transaction(rt: Runtime, who: Principal) -> None:
    """A SAVEPOINT released or rolled back neither runs nor drops the transaction's after-commit work."""
    from shared.db import after_commit

    ran: list[str] = []
    db = rt.sessions()
    try:
        after_commit(db, lambda: ran.append("outer"))
        with db.begin_nested():
            db.execute(select(1))
        assert ran == []  # released, not committed
        try:
            with db.begin_nested():
                after_commit(db, lambda: ran.append("rolled back"))  # its savepoint's work is undone
                raise ValueError
        except ValueError:
            pass
        with db.begin_nested():
            after_commit(db, lambda: ran.append("inner"))
        db.commit()
        assert ran == ["outer", "inner"]
    finally:
        db.close()


def test_a_first_attempt_holds_its_status_events_for_a_delta_a_retry_does_not(rt: Runtime) -> None:
    """turn.started and step.started wait (STATUS_HOLD_SECONDS) to go out with the first delta, in one append."""
    who = Principal("t-hold", "u-hold")
    first = StepEvents(rt, Claim("turn_hold", "ses_hold", 0, 1, 1, who))
    first.add("turn.started", {})
    first.add("step.started", {"step": 0, "attempt": 1})
    assert not first.flush_due()  # alone, they wait for company
    first._pending_since -= STATUS_HOLD_SECONDS  # ... but not for long
    assert first.flush_due()
    with_delta = StepEvents(rt, Claim("turn_hold", "ses_hold", 0, 1, 1, who))
    with_delta.add("step.started", {"step": 0, "attempt": 1})
    with_delta._delta.append("hi")
    assert with_delta.flush_due()
    retry = StepEvents(rt, Claim("turn_hold", "ses_hold", 0, 2, 2, who))
    retry.add("step.retrying", {"step": 0, "attempt": 2, "reason": "died"})
    assert retry.flush_due()  # the attempt before died: this one may too, so it says so at once


def test_the_claim_sets_the_turn_deadline_once_from_its_first_claim(rt: Runtime, who: Principal) -> None:
    """The claim's own UPDATE sets ``deadline_at`` at the turn's first claim (started_at + the limit); a later
    claim keeps it; a turn started without a limit gets one from its start when a limit is set."""
    from shared.engine.claim import claim_and_load

    _, tid = _start_turn(rt, who, "echo", "hi")
    with unit_of_work(rt.sessions, SYSTEM) as db:
        claim, loaded = claim_and_load(db, tid, 0, "w1", 60, 100.0)
    assert claim is not None and loaded is not None and loaded.deadline_at is not None
    with unit_of_work(rt.sessions, SYSTEM) as db:
        turn = db.get(Turn, tid)
        assert turn is not None and turn.started_at is not None
        assert turn.deadline_at == loaded.deadline_at == turn.started_at + timedelta(seconds=100)
        first = turn.deadline_at
        db.execute(update(Turn).where(Turn.id == tid).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with unit_of_work(rt.sessions, SYSTEM) as db:
        again, reloaded = claim_and_load(db, tid, 0, "w2", 60, 500.0)
    assert again is not None and reloaded is not None and reloaded.deadline_at == first
    with unit_of_work(rt.sessions, SYSTEM) as db:
        db.execute(update(Turn).where(Turn.id == tid).values(deadline_at=None,
                                                             lease_expires_at=utcnow() - timedelta(seconds=1)))
    with unit_of_work(rt.sessions, SYSTEM) as db:
        late, late_loaded = claim_and_load(db, tid, 0, "w3", 60, 50.0)
    with unit_of_work(rt.sessions, SYSTEM) as db:
        turn = db.get(Turn, tid)
        assert late is not None and late_loaded is not None and turn is not None and turn.started_at is not None
        assert turn.deadline_at == late_loaded.deadline_at == turn.started_at + timedelta(seconds=50)
    _, other = _start_turn(rt, who, "echo", "no limit")
    with unit_of_work(rt.sessions, SYSTEM) as db:
        claimed, unlimited = claim_and_load(db, other, 0, "w1", 60, 0)
    assert claimed is not None and unlimited is not None and unlimited.deadline_at is None


def test_a_steps_last_deltas_wait_for_its_commit_and_go_out_before_its_events(rt: Runtime, who: Principal) -> None:
    """Once the step hands them to its commit, the watch leaves its last deltas (and durable events) alone: they
    would cost an append of their own. The commit's append sends them, ahead of step.completed; the watch steps
    in after STATUS_HOLD_SECONDS."""
    session_id, turn_id, claim = _claimed_echo_turn(rt, who)
    events = StepEvents(rt, claim)
    events.add("tool.call", {"id": "call_1", "name": "add", "arguments": {}})
    assert events.flush()  # a durable event the step appended itself: the log holds it, that is not the sweep
    events._last_flush = 0.0  # as at a step's start: the first delta goes at once
    events.delta("the first words, ")
    events.delta("the last words")  # held: the flush interval has not passed
    assert events.flush_due()
    events.add("tool.result", {"id": "call_1", "output": "5"})  # durable: the commit writes it, it may wait too
    events.hand_to_commit()
    assert not events.flush_due() and events.pending_count() == 2  # the watch does not send them
    events._handed_at -= STATUS_HOLD_SECONDS  # a commit that takes this long (a database restart) ...
    assert events.flush_due()  # ... and the watch sends them after all
    events._handed_at += STATUS_HOLD_SECONDS
    text = "the first words, the last words"
    result = StepResult(text=text, status="completed", new_messages=[{"role": "assistant", "content": text}])
    assert commit_step(rt, claim, result, [], events) == "completed"
    assert events.pending_count() == 0
    logged = [json.loads(text) for text in rt.events.read(session_id, 0).events]
    assert [(e["type"], e["data"].get("text")) for e in logged if e.get("turn_id") == turn_id] == [
        ("turn.queued", None), ("tool.call", None), ("message.delta", "the first words, "),
        ("message.delta", "the last words"), ("tool.result", None), ("step.completed", text),
        ("turn.completed", None)]


def test_events_other_than_deltas_go_out_before_the_commit(rt: Runtime, who: Principal) -> None:
    """A held event that is not a delta (a tool's unknown outcome) is not left to the commit's append: a worker
    killed between its commit and that append would lose it, where a delta's text is in step.completed."""
    session_id, turn_id, claim = _claimed_echo_turn(rt, who)
    events = StepEvents(rt, claim)
    events._last_flush = time.monotonic()
    events.delta("some words")
    events.add("tool.outcome_unknown", {"id": "call_1", "name": "charge", "policy": "pause"})
    events.hand_to_commit()
    assert events.pending_count() == 0
    logged = [json.loads(text) for text in rt.events.read(session_id, 0).events]
    assert [e["type"] for e in logged if e.get("turn_id") == turn_id] == [
        "turn.queued", "message.delta", "tool.outcome_unknown"]


def test_events_held_for_a_heartbeat_go_out_once_the_commit_vouches_for_the_lease(rt: Runtime, who: Principal) -> None:
    """A starved worker whose heartbeat has not vouched for its lease holds its events; its fenced commit
    landing vouches for it, so they go out, before the commit's own and in its append, instead of being lost."""
    session_id, turn_id, claim = _claimed_echo_turn(rt, who)
    events = StepEvents(rt, claim)
    events.add("step.started", {"step": 0, "attempt": 1})
    events.add("tool.outcome_unknown", {"id": "call_1", "name": "charge", "policy": "rerun"})
    events._delta.append("partial answer")
    events.lease_valid_until = time.monotonic() - 1  # no heartbeat has vouched for the lease lately
    assert events.flush() is False and events.pending_count() == 3  # held, not dropped
    result = StepResult(text="partial answer", status="completed",
                        new_messages=[{"role": "assistant", "content": "partial answer"}])
    assert commit_step(rt, claim, result, [], events) == "completed"
    assert events.pending_count() == 0
    logged = [json.loads(text) for text in rt.events.read(session_id, 0).events]
    types = [e["type"] for e in logged if e.get("turn_id") == turn_id]
    assert types == ["turn.queued", "step.started", "tool.outcome_unknown", "message.delta", "step.completed",
                     "turn.completed"], types
