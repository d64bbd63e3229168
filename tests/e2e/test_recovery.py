"""Nothing is lost when processes die: real workers, web processes, Redis and Postgres, killed mid-turn.

Workers run as the Procfile runs them (Celery, gevent pool) in their own process
group and are killed with SIGKILL to the whole group, the way a platform kills a
dyno. Redis and Postgres restarts use servers this module starts itself on free
loopback ports; the machine's shared ones are never touched. Leases are the
fixtures' (3 s, heartbeat 0.5 s, sweep 0.5 s), so a dead worker's step resumes
about 3 s after the kill. `pytest -s` prints the measured kill-to-resume times.
"""
from __future__ import annotations

import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from shared.settings import Settings
from tests.support.processes import Procs
from tests.support.recovery_support import (
    Client,
    Deployment,
    OwnPostgres,
    OwnRedis,
    deploy,
    drop_database,
    fresh_database,
    is_,
    kill_group,
    own_settings,
    streamed_text,
)

# No request needs Redis for a rate limit (the API keeps answering while Redis restarts).
NO_RATE_LIMIT = {"STEPRUN_RATE_LIMIT_PER_MINUTE": "0", "STEPRUN_RATE_LIMIT_PER_KEY": "0",
                 "STEPRUN_RATE_LIMIT_PER_TENANT": "0"}


@pytest.fixture(scope="module")
def rec(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """web + scheduler on a database of their own; each test starts (and kills) its workers."""
    url = fresh_database()
    own = own_settings(settings, url)
    procs = Procs(own, tmp_path_factory.mktemp("recovery"))
    try:
        yield deploy(procs, own, worker=False, **NO_RATE_LIMIT)
    finally:
        procs.stop_all()
        drop_database(url)


@pytest.fixture
def workers(rec: Deployment) -> Iterator[Deployment]:
    """The module's deployment; the workers a test starts are killed at its end."""
    yield rec
    while rec.workers:
        rec.workers.pop().kill()


def _history_is_each_step_once(c: Client, session_id: str, turn: dict[str, Any]) -> None:
    """Two steps (talk + tool call, tool result, talk): every message once, the answer in order."""
    history = c.messages(session_id)
    assert [(m["role"], m["status"]) for m in history] == [
        ("user", "complete"), ("assistant", "complete"), ("tool", "complete"), ("assistant", "complete")]
    assert history[1]["content"] + history[3]["content"] == turn["output"]


def _dropping_retried(events: list[dict[str, Any]], turn_id: str) -> str:
    """A client that drops a step's earlier deltas whenever that step says step.retrying."""
    per_step: dict[int, str] = {}
    for e in events:
        if e["turn_id"] != turn_id:
            continue
        if e["type"] == "step.retrying":
            per_step[e["data"]["step"]] = ""
        elif e["type"] == "message.delta":
            step = e["data"]["step"]
            per_step[step] = per_step.get(step, "") + e["data"]["text"]
    return "".join(per_step[s] for s in sorted(per_step))


def test_sigkill_workers_mid_stream_again_and_again(workers: Deployment) -> None:
    c = workers.client()
    worker = workers.worker()
    # (turn, step) pairs to kill the worker in, mid-stream: five kills over three turns.
    plan = [[0, 1], [0, 1], [1]]
    resumed_after: list[float] = []
    turns = []
    for i, steps in enumerate(plan):
        sid = c.session("streamer")
        turn = c.start(sid, f"add {i} and {i + 40}")
        cursor = 0
        for step in steps:
            delta = c.wait_event(sid, is_("message.delta", step=step), after=cursor)
            killed_at = time.time()
            workers.workers.remove(worker)
            worker.kill()  # SIGKILL to the worker's whole process group
            worker = workers.worker()
            retry = c.wait_event(sid, is_("step.retrying", step=step), after=delta["cursor"], timeout=30)
            assert retry["data"]["attempt"] == 2 and "lease" in retry["data"]["reason"]
            resumed_after.append(retry["ts"] - killed_at)
            cursor = retry["cursor"]
        turns.append((sid, turn["id"], i))

    for sid, turn_id, i in turns:
        done = c.wait_turn(turn_id, timeout=30)
        assert done["status"] == "completed", done
        assert f"The result of add is {2 * i + 40}." in done["output"]
        _history_is_each_step_once(c, sid, done)
        events = c.all_events(sid)
        assert streamed_text(events, turn_id) == done["output"]  # keeping the committed attempts
        assert _dropping_retried(events, turn_id) == done["output"]  # dropping at step.retrying
        assert [e["type"] for e in events].count("step.completed") == 2
    print(f"\nkill-to-resume over {len(resumed_after)} SIGKILLs: "
          + ", ".join(f"{t:.2f}" for t in resumed_after)
          + f" s (mean {statistics.mean(resumed_after):.2f}, max {max(resumed_after):.2f}; lease 3 s)")
    assert max(resumed_after) < 3 + 0.5 + 2.5  # lease + sweep interval + slack


def test_a_step_that_kills_its_worker_fails_the_turn_after_max_attempts(workers: Deployment) -> None:
    c = workers.client()
    sid = c.session("poison")
    worker = workers.worker(STEPRUN_MAX_ATTEMPTS="2")
    turn = c.start(sid, "crash 1")
    for _ in range(2):  # each attempt kills the worker running it
        worker.popen.wait(timeout=20)
        worker = workers.worker(STEPRUN_MAX_ATTEMPTS="2")
    done = c.wait_turn(turn["id"], timeout=30)
    assert done["status"] == "failed", done
    error = done["error"]
    assert error["code"] == "max_attempts"
    assert "failed 2 times" in error["message"] and "STEPRUN_MAX_ATTEMPTS=2" in error["message"]
    assert "stopped renewing its lease" in error["message"]
    types = [e["type"] for e in c.all_events(sid)]
    assert types.count("step.retrying") == 1 and types[-1] == "turn.failed"


def test_a_step_longer_than_the_lease_runs_once(workers: Deployment) -> None:
    c = workers.client()
    workers.worker()
    sid = c.session("slowpoke")
    # Step 0 streams for ~3 s, then its tool call sleeps 3.2 s: both longer than the 3 s lease.
    turn = c.start(sid, "slow_lookup 3.2")
    done = c.wait_turn(turn["id"], timeout=40)
    assert done["status"] == "completed", done
    events = c.all_events(sid)
    started = [e for e in events if e["type"] == "step.started"]
    assert [(e["data"]["step"], e["data"]["attempt"]) for e in started] == [(0, 1), (1, 1)]
    assert not [e for e in events if e["type"] == "step.retrying"]
    assert [e["type"] for e in events].count("tool.result") == 1
    _history_is_each_step_once(c, sid, done)
    first = next(e for e in events if e["type"] == "step.completed")
    assert first["ts"] - started[0]["ts"] > 2 * workers.settings.lease_seconds


def test_step_time_limit_interrupts_a_blocked_tool(workers: Deployment) -> None:
    c = workers.client()
    workers.worker(STEPRUN_STEP_TIME_LIMIT="1.5")
    sid = c.session("stuck")
    turn = c.start(sid, "hang 60")
    done = c.wait_turn(turn["id"], timeout=20)
    assert done["status"] == "failed" and done["error"]["code"] == "step_time_limit", done
    assert "STEPRUN_STEP_TIME_LIMIT" in done["error"]["message"]
    ran = c.all_events(sid)
    assert ran[-1]["type"] == "turn.failed"
    took = ran[-1]["ts"] - next(e for e in ran if e["type"] == "step.started")["ts"]
    assert took < 5, took  # gevent ignores Celery time limits: the step watch interrupted the tool
    history = c.messages(sid)
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]
    assert history[2]["content"] == "stopped: the step ran out of time"


def test_sigterm_mid_step_finishes_or_hands_back(workers: Deployment) -> None:
    c = workers.client()
    # A short grace: the step is handed back, and another worker resumes it without waiting for the lease.
    leaving = workers.worker(STEPRUN_SHUTDOWN_GRACE_SECONDS="0.5")
    sid = c.session("paced")
    turn = c.start(sid, "say 200")  # five seconds of streaming
    delta = c.wait_event(sid, is_("message.delta"))
    workers.worker()  # the one that stays (it starts while the other streams)
    term_at = time.time()
    kill_group(leaving, signal.SIGTERM)
    retry = c.wait_event(sid, is_("step.retrying", step=0), after=delta["cursor"])
    assert leaving.popen.wait(timeout=15) == 0  # it shut down by itself, cleanly
    assert retry["data"]["reason"] == "the worker running it shut down"
    print(f"\nSIGTERM-to-resume (handed back): {retry['ts'] - term_at:.2f} s")
    done = c.wait_turn(turn["id"], timeout=20)
    assert done["status"] == "completed", done
    events = c.all_events(sid)
    assert streamed_text(events, turn["id"]) == done["output"] == _dropping_retried(events, turn["id"])
    assert [m["role"] for m in c.messages(sid)] == ["user", "assistant"]

    # The default grace: the running step finishes on the worker that is shutting down.
    while workers.workers:
        workers.workers.pop().kill()
    finishing = workers.worker()
    sid = c.session("paced")
    turn = c.start(sid, "say 60")
    c.wait_event(sid, is_("message.delta"))
    kill_group(finishing, signal.SIGTERM)
    assert finishing.popen.wait(timeout=15) == 0  # it left once its step was done
    done = c.turn(turn["id"])
    assert done["status"] == "completed" and done["output"].startswith("Saying 60 words:")
    assert "step.retrying" not in [e["type"] for e in c.all_events(sid)]


def test_an_api_process_dies_and_the_client_reads_on_from_another(workers: Deployment) -> None:
    workers.worker()
    doomed, first_url = workers.web()
    c = Client(first_url, workers.key)
    sid = c.session("streamer")
    turn = c.start(sid, "add 20 and 22")
    seen: list[dict[str, Any]] = []
    cursor = 0
    while sum(e["type"] == "message.delta" for e in seen) < 3:
        body = c.events(sid, cursor, wait=2).json()
        seen += body["data"]
        cursor = body["next"]
    kill_group(doomed)
    doomed.popen.wait(timeout=10)

    c.url = workers.url  # another API process, as a load balancer would pick
    while not seen or seen[-1]["type"] != "turn.completed":
        r = c.events(sid, cursor, wait=5)
        assert r.status_code == 200, r.text
        seen += r.json()["data"]
        cursor = r.json()["next"]
    cursors = [e["cursor"] for e in seen]
    assert cursors == sorted(set(cursors))  # each event once, in order
    assert seen == c.all_events(sid)  # and none missed
    done = c.turn(turn["id"])
    assert done["status"] == "completed" and streamed_text(seen, turn["id"]) == done["output"]


def test_redis_restart_mid_turn(settings: Settings, tmp_path: Path) -> None:
    redis_server = OwnRedis(tmp_path)
    redis_server.start()
    url = fresh_database()
    own = own_settings(settings, url, redis_url=redis_server.url, lost_task_seconds=3.0)
    procs = Procs(own, tmp_path)
    try:
        d = deploy(procs, own, STEPRUN_LOST_TASK_SECONDS="3", **NO_RATE_LIMIT)
        c = d.client()
        sid = c.session("streamer")
        turn = c.start(sid, "add 7 and 8")
        old = c.wait_event(sid, is_("message.delta", step=0))

        # Redis goes away while step 0 streams, past the step's commit (so the enqueue of
        # step 1 is lost too), and comes back empty: no queue, no event log.
        redis_server.kill()
        outage_end = time.monotonic() + 4
        while time.monotonic() < outage_end:
            r = c.get(f"/v1/turns/{turn['id']}")  # Postgres answers turn reads meanwhile
            assert r.status_code == 200 and r.json()["status"] == "in_progress", r.text
            assert requests.get(f"{d.url}/readyz", timeout=5).status_code == 503
            time.sleep(0.5)
        redis_server.start()

        done = c.wait_turn(turn["id"], timeout=30)
        assert done["status"] == "completed", done
        assert done["output"].count("The result of add is 15.") == 1
        _history_is_each_step_once(c, sid, done)

        gone = c.events(sid, old["cursor"])
        assert gone.status_code == 410 and f"/v1/sessions/{sid}/messages" in gone.json()["error"]["message"]
        fresh = c.all_events(sid)  # from the start of the log Redis keeps now
        assert fresh and fresh[0]["cursor"] > old["cursor"]  # cursors never go back
        assert fresh[-1]["type"] == "turn.completed" and fresh[-1]["data"]["output"] == done["output"]
        scheduler_log = "".join(p.log() for p in procs.started if p.name == "scheduler")
        # Step 0 committed while Redis was away, so the enqueue of step 1 was lost: the
        # lost-task sweep sent it again (once the queue reads again, as not in it; while
        # Redis is away, past STEPRUN_LOST_TASK_SECONDS). No step ran twice.
        assert ("step 1 unclaimed for" in scheduler_log and "not in the queue" in scheduler_log) or (
            "no worker took step 1" in scheduler_log)
        assert "step.retrying" not in [e["type"] for e in fresh]
    finally:
        procs.stop_all()
        redis_server.kill()
        drop_database(url)


def test_postgres_restart_answers_503_then_recovers(settings: Settings, tmp_path: Path) -> None:
    pg = OwnPostgres()
    pg.init()
    pg.start()
    own = own_settings(settings, pg.url)
    from shared.db import make_engine
    from shared.migrate import upgrade

    engine = make_engine(own)
    upgrade(engine)
    engine.dispose()
    procs = Procs(own, tmp_path)
    try:
        d = deploy(procs, own, **NO_RATE_LIMIT)
        c = d.client()
        sid = c.session("streamer")
        turn = c.start(sid, "add 30 and 12")
        c.wait_event(sid, is_("message.delta", step=0))

        pg.stop("fast")  # every connection is cut; new ones are refused
        for attempt in (lambda: c.get("/v1/sessions"), lambda: c.post(f"/v1/sessions/{sid}/turns", {"input": "x"}),
                        lambda: c.get(f"/v1/turns/{turn['id']}")):
            r = attempt()
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "unavailable" and int(r.headers["Retry-After"]) >= 1
        assert requests.get(f"{d.url}/readyz", timeout=5).status_code == 503
        time.sleep(1.5)
        pg.start()

        deadline = time.monotonic() + 15
        while c.get("/v1/sessions").status_code != 200:  # no restart of anything: it heals on its own
            assert time.monotonic() < deadline, "the API did not recover after Postgres came back"
            time.sleep(0.2)
        done = c.wait_turn(turn["id"], timeout=30)
        assert done["status"] == "completed", done
        _history_is_each_step_once(c, sid, done)
        assert streamed_text(c.all_events(sid), turn["id"]) == done["output"]
        after = c.start(sid, "add 1 and 1")  # and new work runs
        assert c.wait_turn(after["id"])["status"] == "completed"
    finally:
        procs.stop_all()
        pg.remove()
