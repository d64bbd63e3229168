"""Turns that start themselves, end to end: real web, worker and scheduler processes over HTTP.

One deployment on a database of its own whose schedulers are started (and
killed) by the tests; intervals may be as short as 1 s
(STEPRUN_SCHEDULE_MIN_SECONDS=1) so that several runs fit in a few seconds.
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings
from tests.support.processes import BIN, Proc, Procs, free_port, settings_env, wait_http
from tests.support.recovery_support import (
    Client,
    Deployment,
    deploy,
    drop_database,
    fresh_database,
    new_key,
    own_settings,
)

ENV = {"STEPRUN_SCHEDULE_MIN_SECONDS": "1", "STEPRUN_SCHEDULE_POLL_SECONDS": "0.2",
       "STEPRUN_RATE_LIMIT_PER_MINUTE": "0", "STEPRUN_RATE_LIMIT_PER_KEY": "0"}


@pytest.fixture(scope="module")
def dep(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    url = fresh_database()
    own = own_settings(settings, url)
    procs = Procs(own, tmp_path_factory.mktemp("schedules"))
    try:
        yield deploy(procs, own, scheduler=False, **ENV)
    finally:
        procs.stop_all()
        drop_database(url)


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _scheduler(dep: Deployment) -> Proc:
    return dep.procs.scheduler(env=dep.env)


def _runs(c: Client, schedule_id: str) -> list[dict[str, Any]]:
    r = c.get(f"/v1/schedules/{schedule_id}/runs?limit=100")
    assert r.status_code == 200, r.text
    return r.json()["data"]


def _wait_runs(c: Client, schedule_id: str, n: int, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        runs = _runs(c, schedule_id)
        if len(runs) >= n or time.monotonic() > deadline:
            return runs
        time.sleep(0.1)


def _create(c: Client, **body: Any) -> dict[str, Any]:
    r = c.post("/v1/schedules", {"agent": "quick", "input": "hello", **body})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture
def schedulers(dep: Deployment) -> Iterator[list[Proc]]:
    """The schedulers a test starts (with ``schedulers.append(_scheduler(dep))``), killed however it ends."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.kill()


def _fired_slots(procs: list[Proc], schedule_id: str) -> list[str]:
    """The slots the schedulers' logs say they fired for ``schedule_id``, one entry per firing."""
    return re.findall(rf"schedule {schedule_id}: run at (\S+) started turn", "".join(p.log() for p in procs))


def test_a_delayed_turn_starts_within_a_second_of_its_time(dep: Deployment, schedulers: list[Proc]) -> None:
    schedulers.append(_scheduler(dep))
    c = dep.client()
    sid = c.session("quick")
    later = c.start(sid, "later", after_seconds=2)
    at = (datetime.now(timezone.utc) + timedelta(seconds=2.5)).astimezone(timezone(timedelta(hours=-7)))
    pinned = c.start(c.session("quick"), "at a time", at=at.isoformat())
    assert later["status"] == "queued" and later["scheduled_at"] and pinned["scheduled_at"]
    # The session is not taken while it waits: a turn sent now runs now.
    now = c.wait_turn(c.start(sid, "now")["id"], timeout=10)
    assert now["status"] == "completed" and c.turn(later["id"])["status"] == "queued"
    for turn in (later, pinned):
        done = c.wait_turn(turn["id"], timeout=15)
        assert done["status"] == "completed", done
        late = (_at(done["started_at"]) - _at(done["scheduled_at"])).total_seconds()
        print(f"\ndelayed turn started {late:.3f} s after its time")
        assert 0 <= late < 1.0, done
    # A delayed turn can be cancelled before its time, and then never runs.
    waiting = c.start(c.session("quick"), "never", after_seconds=60)
    assert c.post(f"/v1/turns/{waiting['id']}/cancel").json()["status"] == "cancelled"


def test_two_schedulers_fire_every_run_once_and_a_paused_schedule_does_not_fire(
        dep: Deployment, schedulers: list[Proc]) -> None:
    schedulers += [_scheduler(dep), _scheduler(dep)]
    c = dep.client()
    s = _create(c, every_seconds=1)
    time.sleep(6.5)
    r = c.post(f"/v1/schedules/{s['id']}", {})  # POST is not the update verb
    assert r.status_code == 405
    r = c.http.patch(f"{c.url}/v1/schedules/{s['id']}", json={"paused": True}, headers=c.headers, timeout=30)
    assert r.status_code == 200 and r.json()["paused"] is True and r.json()["next_run_at"] is None, r.text
    runs = _runs(c, s["id"])
    starts = sorted(_at(t["created_at"]).timestamp() for t in runs)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    print(f"\n{len(runs)} runs in 6.5 s with two schedulers; gaps {[round(g, 2) for g in gaps]}")
    assert 5 <= len(runs) <= 7, runs
    slots = _fired_slots(schedulers, s["id"])
    assert len(slots) == len(set(slots)) == len(runs), slots  # no slot fired twice, by either scheduler
    assert all(g > 0.4 for g in gaps), gaps  # a duplicate of a slot would start within one poll (0.2 s)
    assert len({t["session_id"] for t in runs}) == len(runs)  # a new session per run
    assert c.get(f"/v1/schedules/{s['id']}").json()["run_count"] == len(runs)
    for t in runs:
        assert c.wait_turn(t["id"], timeout=15)["status"] == "completed"

    time.sleep(3)  # paused: nothing more
    assert len(_runs(c, s["id"])) == len(runs)
    r = c.http.patch(f"{c.url}/v1/schedules/{s['id']}", json={"paused": False}, headers=c.headers, timeout=30)
    assert r.status_code == 200 and r.json()["next_run_at"], r.text
    assert len(_wait_runs(c, s["id"], len(runs) + 1, timeout=5)) == len(runs) + 1
    assert c.http.delete(f"{c.url}/v1/schedules/{s['id']}", headers=c.headers, timeout=30).status_code == 200


def test_a_restarted_scheduler_fires_the_missed_run_once(dep: Deployment, schedulers: list[Proc]) -> None:
    sched = _scheduler(dep)
    schedulers.append(sched)
    c = dep.client()
    s = _create(c, every_seconds=3)
    assert len(_wait_runs(c, s["id"], 1, timeout=8)) == 1
    sched.kill()  # SIGKILL: no goodbye
    time.sleep(8)  # two or three runs are missed
    assert len(_runs(c, s["id"])) == 1
    restarted = time.time()
    sched = _scheduler(dep)
    schedulers.append(sched)
    runs = _wait_runs(c, s["id"], 2, timeout=10)
    assert len(runs) == 2, runs
    caught_up = _at(runs[0]["created_at"]).timestamp()
    time.sleep(max(0.0, caught_up + 2.0 - time.time()))  # well before the next period ends
    assert len(_runs(c, s["id"])) == 2, "the missed runs were fired more than once"
    print(f"\nmissed run fired {caught_up - restarted:.2f} s after the scheduler restarted")
    assert len(_wait_runs(c, s["id"], 3, timeout=5)) == 3  # and the schedule goes on
    c.http.delete(f"{c.url}/v1/schedules/{s['id']}", headers=c.headers, timeout=30)


def test_another_user_cannot_see_or_change_a_schedule(dep: Deployment) -> None:
    c = dep.client()
    s = _create(c, cron="0 9 * * 1-5", timezone="Europe/Paris")
    assert s["object"] == "schedule" and s["cron"] == "0 9 * * 1-5" and s["timezone"] == "Europe/Paris"
    assert _at(s["next_run_at"]).astimezone(timezone(timedelta(hours=1))).hour in (8, 9)
    other = Client(dep.url, new_key(dep.settings.database_url or ""))
    assert other.get("/v1/schedules").json()["data"] == []
    assert other.get(f"/v1/schedules/{s['id']}").status_code == 404
    assert other.get(f"/v1/schedules/{s['id']}/runs").status_code == 404
    r = other.http.patch(f"{dep.url}/v1/schedules/{s['id']}", json={"paused": True}, headers=other.headers,
                         timeout=30)
    assert r.status_code == 404, r.text
    assert other.http.delete(f"{dep.url}/v1/schedules/{s['id']}", headers=other.headers, timeout=30).status_code == 404
    mine = c.get(f"/v1/schedules/{s['id']}").json()
    assert mine["paused"] is False
    r = c.post("/v1/schedules", {"agent": "quick", "input": "x", "cron": "61 * * * *"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "cron"


def test_steprun_dev_runs_schedules_and_delayed_turns(settings: Settings, procs: Procs, tmp_path: Path) -> None:
    env = {k: v for k, v in settings_env(settings).items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(STEPRUN_DATA_DIR=str(tmp_path / ".steprun"), STEPRUN_AGENTS="tests.support.agents_recovery",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]), **ENV)
    port = free_port()
    proc = procs.start("dev", [str(BIN / "steprun"), "dev", "--port", str(port)], env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc)
    key = (tmp_path / ".steprun" / "dev-key").read_text().strip()
    c = Client(url, key)
    s = _create(c, every_seconds=1)
    delayed = c.start(c.session("quick"), "later", after_seconds=1.5)
    done = c.wait_turn(delayed["id"], timeout=15)
    assert done["status"] == "completed" and (_at(done["started_at"]) - _at(done["scheduled_at"])).total_seconds() < 1
    runs = _wait_runs(c, s["id"], 3, timeout=10)
    assert len(runs) >= 3 and all(c.wait_turn(t["id"])["status"] == "completed" for t in runs)
