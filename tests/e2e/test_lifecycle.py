"""Long-lived turns end to end over HTTP: cancel, approve, decline, ask, expire, interrupt, limits, retention.

One deployment (web, Celery worker, scheduler: the Procfile's processes) on a
database of its own, with short limits so that every deadline is reached in
seconds: a pause expires after 6 s, a turn may run 4 s, an idle session lives
5 s, three checkpoints are kept per session.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text

from shared import checkpoints
from shared.models import Checkpoint
from shared.settings import Settings
from tests.support.processes import Procs
from tests.support.recovery_support import Deployment, deploy, drop_database, fresh_database, is_, own_settings

ACTION_TIMEOUT = 6.0
TURN_TIME_LIMIT = 4.0
SESSION_TTL = 5.0


@pytest.fixture(scope="module")
def life(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    url = fresh_database()
    own = own_settings(settings, url)
    procs = Procs(own, tmp_path_factory.mktemp("lifecycle"))
    try:
        yield deploy(procs, own, STEPRUN_ACTION_TIMEOUT_SECONDS=str(ACTION_TIMEOUT),
                     STEPRUN_TURN_TIME_LIMIT=str(TURN_TIME_LIMIT), STEPRUN_SESSION_TTL_SECONDS=str(SESSION_TTL),
                     STEPRUN_CHECKPOINT_KEEP="3", STEPRUN_LIFECYCLE_INTERVAL="0.5",
                     STEPRUN_RATE_LIMIT_PER_MINUTE="0")
    finally:
        procs.stop_all()
        drop_database(url)


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_cancel_stops_the_stream_within_a_second_and_keeps_the_partial_answer(life: Deployment) -> None:
    c = life.client()
    sid = c.session("paced")
    turn = c.start(sid, "say 200")  # five seconds of streaming
    c.wait_event(sid, is_("message.delta"))
    time.sleep(0.3)

    asked = time.time()
    r = c.post(f"/v1/turns/{turn['id']}/cancel")
    assert r.status_code == 200, r.text
    done = c.wait_turn(turn["id"], timeout=10)
    assert done["status"] == "cancelled", done

    events = c.all_events(sid)
    stopped = next(e for e in events if e["type"] == "turn.cancelled")
    deltas = [e for e in events if e["type"] == "message.delta"]
    print(f"\ncancel: stream stopped {deltas[-1]['ts'] - asked:.3f} s and the turn ended "
          f"{stopped['ts'] - asked:.3f} s after the request")
    assert stopped["ts"] - asked < 1.0 and deltas[-1]["ts"] - asked < 1.0
    partial = "".join(e["data"]["text"] for e in deltas)
    assert partial.startswith("Saying 200 words:") and len(partial.split()) < 150

    history = [(m["role"], m["status"], m["content"]) for m in c.messages(sid)]
    assert history == [("user", "complete", "say 200"), ("assistant", "cancelled", partial)]
    assert done["output"] == partial

    again = c.post(f"/v1/turns/{turn['id']}/cancel")  # idempotent: same answer, nothing new happens
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert len(c.all_events(sid)) == len(events)


def test_approval_pauses_and_resumes_on_another_worker(life: Deployment) -> None:
    c = life.client()
    sid = c.session("bank")
    turn = c.start(sid, "transfer 10 to bob")
    paused = c.wait_turn(turn["id"])
    assert paused["status"] == "requires_action", paused
    pending = paused["pending"]
    call = pending["tool_calls"][0]
    assert pending["reason"] == "approval" and call["name"] == "transfer" and pending["needs_approval"] == [call["id"]]
    assert 0 < _ts(pending["expires_at"]) - time.time() <= ACTION_TIMEOUT
    event = c.wait_event(sid, is_("turn.requires_action"))
    assert event["data"]["reason"] == "approval" and event["data"]["pending"]["tool_calls"] == [call]

    # Nothing is held while paused: the worker that ran the step can go away.
    old = life.workers.pop()
    life.worker()
    old.kill()

    bad = c.post(f"/v1/turns/{turn['id']}/resume", {"input": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "approve"
    r = c.post(f"/v1/turns/{turn['id']}/resume", {"approve": True})
    assert r.status_code == 202, r.text
    done = c.wait_turn(turn["id"])
    assert done["status"] == "completed", done
    assert done["output"] == "The result of transfer is sent 10.00 to 10 to bob."
    history = c.messages(sid)
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[2]["content"] == "sent 10.00 to 10 to bob"
    late = c.post(f"/v1/turns/{turn['id']}/resume", {"approve": True})
    assert late.status_code == 409


def test_declined_action_is_not_run_and_the_model_is_told(life: Deployment) -> None:
    c = life.client()
    sid = c.session("bank")
    turn = c.start(sid, "transfer 99 to mallory")
    assert c.wait_turn(turn["id"])["status"] == "requires_action"
    assert c.post(f"/v1/turns/{turn['id']}/resume", {"approve": False}).status_code == 202
    done = c.wait_turn(turn["id"])
    assert done["status"] == "completed"
    assert done["output"] == "The result of transfer is The user declined this action.."  # (scripted adds ".")
    result = c.wait_event(sid, is_("tool.result"))
    assert result["data"]["declined"] is True
    assert [m["content"] for m in c.messages(sid) if m["role"] == "tool"] == ["The user declined this action."]


def test_the_agent_asks_the_user_and_gets_the_answer(life: Deployment) -> None:
    c = life.client()
    sid = c.session("bank")
    turn = c.start(sid, "ask_user which account should I use")
    paused = c.wait_turn(turn["id"])
    assert paused["status"] == "requires_action"
    assert paused["pending"]["reason"] == "question"
    assert [q["question"] for q in paused["pending"]["questions"]] == ["which account should I use"]
    missing = c.post(f"/v1/turns/{turn['id']}/resume", {"approve": True})
    assert missing.status_code == 400 and missing.json()["error"]["field"] == "input"
    assert c.post(f"/v1/turns/{turn['id']}/resume", {"input": "savings"}).status_code == 202
    done = c.wait_turn(turn["id"])
    assert done["status"] == "completed" and done["output"] == "The result of ask_user is savings."


def test_an_unanswered_pause_expires_and_the_session_moves_on(life: Deployment) -> None:
    c = life.client()
    sid = c.session("bank")
    first = c.start(sid, "transfer 5 to carol")
    assert c.wait_turn(first["id"])["status"] == "requires_action"
    second = c.start(sid, "add 1 and 2")  # queued behind the paused turn
    assert second["status"] == "queued"

    expired = c.wait_turn(first["id"], timeout=ACTION_TIMEOUT + 10, statuses=frozenset({"expired"}))
    assert expired["error"]["code"] == "action_timeout"
    assert "STEPRUN_ACTION_TIMEOUT_SECONDS" in expired["error"]["message"]
    assert _ts(expired["finished_at"]) - _ts(expired["created_at"]) >= ACTION_TIMEOUT
    event = c.wait_event(sid, is_("turn.expired"))
    assert event["turn_id"] == first["id"] and event["data"]["error"]["code"] == "action_timeout"
    r = c.post(f"/v1/turns/{first['id']}/resume", {"approve": True})
    assert r.status_code == 409 and "expired" in r.json()["error"]["message"]

    done = c.wait_turn(second["id"])  # the session went on to the next turn
    assert done["status"] == "completed" and done["output"] == "The result of add is 3."


def test_interrupt_cancels_what_is_ahead_and_runs_next(life: Deployment) -> None:
    c = life.client()
    sid = c.session("paced")
    running = c.start(sid, "say 200")
    c.wait_event(sid, is_("message.delta"))
    waiting = c.start(sid, "say 3")
    assert waiting["status"] == "queued"
    rejected = c.post(f"/v1/sessions/{sid}/turns", {"input": "say 4", "on_busy": "reject"})
    assert rejected.status_code == 409 and running["id"] in rejected.json()["error"]["message"]

    asked = time.time()
    now = c.start(sid, "say 6", on_busy="interrupt")
    done = c.wait_turn(now["id"])
    assert done["status"] == "completed" and done["output"].startswith("Saying 6 words:")

    first, second = c.turn(running["id"]), c.turn(waiting["id"])
    assert first["status"] == "cancelled" and _ts(first["finished_at"]) - asked < 1.0
    assert second["status"] == "cancelled" and second["started_at"] is None
    assert _ts(done["started_at"]) >= _ts(first["finished_at"])
    history = [(m["role"], m["status"]) for m in c.messages(sid)]
    assert history == [("user", "complete"), ("assistant", "cancelled"), ("user", "complete"),
                       ("assistant", "complete")]


def test_concurrent_turns_on_one_session_never_overlap(life: Deployment) -> None:
    c = life.client()
    sid = c.session("quick")
    barrier = threading.Barrier(8)
    created: list[dict[str, Any]] = []

    def post(i: int) -> None:
        barrier.wait()
        created.append(life.client().start(sid, f"message {i}"))

    threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(created) == 8
    turns = [c.wait_turn(t["id"]) for t in created]
    assert all(t["status"] == "completed" for t in turns), turns
    spans = sorted((_ts(t["started_at"]), _ts(t["finished_at"])) for t in turns)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, spans  # one turn at a time, whatever the arrival order
    users = [m["content"] for m in c.messages(sid) if m["role"] == "user"]
    assert sorted(users) == sorted(f"message {i}" for i in range(8))


def test_limits_end_turns_as_incomplete(life: Deployment) -> None:
    c = life.client()
    steps = c.start(c.session("onestep"), "add 1 and 2")
    tokens = c.start(c.session("terse"), "hello")
    looping = c.start(c.session("looper"), "go")

    done = c.wait_turn(steps["id"])
    assert done["status"] == "incomplete" and done["error"]["code"] == "max_steps"
    done = c.wait_turn(tokens["id"])
    assert done["status"] == "incomplete" and done["error"]["code"] == "max_output_tokens"
    assert done["output"] == "You said: hello steady tokens" and done["usage"]["output_tokens"] == 5
    done = c.wait_turn(looping["id"], timeout=TURN_TIME_LIMIT + 15)
    assert done["status"] == "incomplete" and done["error"]["code"] == "max_turn_time", done
    assert "STEPRUN_TURN_TIME_LIMIT" in done["error"]["message"]
    ran = _ts(done["finished_at"]) - _ts(done["started_at"])
    assert TURN_TIME_LIMIT <= ran < TURN_TIME_LIMIT + 2.5, ran
    assert done["steps"] > 3


def test_old_checkpoints_are_pruned_and_the_session_carries_on(life: Deployment) -> None:
    c = life.client()
    sid = c.session("bank")
    # Two steps per turn: past the second keyframe (shared/checkpoints.py), so the kept three build on it.
    count = checkpoints.KEYFRAME_EVERY // 2 + 2
    for a in range(1, count + 1):
        assert c.wait_turn(c.start(sid, f"add {a} and 10")["id"])["status"] == "completed"
    newest = 2 * count
    keyframe = checkpoints.KEYFRAME_EVERY + 1
    kept = list(range(keyframe, newest + 1))  # the latest three, and back to the keyframe they build on
    engine = create_engine((life.settings.database_url or "").replace("postgresql://", "postgresql+psycopg2://"))
    try:
        deadline = time.monotonic() + 10
        with engine.connect() as conn:
            while True:
                numbers = sorted(conn.execute(select(Checkpoint.number).where(Checkpoint.session_id == sid)).scalars())
                conn.rollback()
                if numbers == kept or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        assert numbers == kept and newest - keyframe + 1 > 3
        done = c.wait_turn(c.start(sid, "add 4 and 10")["id"])
        assert done["status"] == "completed" and done["output"] == "The result of add is 14."
        assert len(c.messages(sid)) == 4 * (count + 1)  # the history is whole: pruning touches checkpoints only
    finally:
        engine.dispose()


def test_idle_sessions_expire_with_their_data(life: Deployment) -> None:
    c = life.client()
    sid = c.session("quick")
    assert c.wait_turn(c.start(sid, "remember me")["id"])["status"] == "completed"
    assert c.get(f"/v1/sessions/{sid}").status_code == 200
    deadline = time.monotonic() + SESSION_TTL + 10
    while c.get(f"/v1/sessions/{sid}").status_code == 200:
        assert time.monotonic() < deadline, "the idle session was not deleted"
        time.sleep(0.5)
    assert c.get(f"/v1/sessions/{sid}").status_code == 404
    assert c.get(f"/v1/sessions/{sid}/messages").status_code == 404
    engine = create_engine((life.settings.database_url or "").replace("postgresql://", "postgresql+psycopg2://"))
    try:
        with engine.connect() as conn:
            for table in ("turns", "messages", "checkpoints"):
                left = conn.execute(text(f"SELECT count(*) FROM {table} WHERE session_id = :s"), {"s": sid}).scalar()
                assert left == 0, table
            assert conn.execute(select(func.count()).select_from(Checkpoint)).scalar() is not None
    finally:
        engine.dispose()
