"""Streams that never lie and never stall (DESIGN section 5), with real processes and their faults.

- a worker frozen past its lease (SIGSTOP) and then resumed: no stale delta reaches any client;
- Redis restarted from an older snapshot and with nothing, mid-turn and while a turn ends: every
  client, holding whatever cursor, ends with the exact text and the terminal event;
- with the default settings a lost broker message and a killed worker's step resume in seconds.

Clients follow the client rule (shared/streaming/view.py) and read the JSON events route; a 410
names the cursor to read on from, which they follow.
"""
from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from shared.settings import Settings
from shared.streaming.view import TurnView
from tests.support.processes import Procs
from tests.support.recovery_support import (
    Client,
    Deployment,
    OwnRedis,
    deploy,
    drop_database,
    fresh_database,
    is_,
    kill_group,
    own_settings,
)

NO_RATE_LIMIT = {"STEPRUN_RATE_LIMIT_PER_MINUTE": "0", "STEPRUN_RATE_LIMIT_PER_KEY": "0",
                 "STEPRUN_RATE_LIMIT_PER_TENANT": "0"}
READ_ON = re.compile(r"after=(\d+)")


class Follower(threading.Thread):
    """A polling client of one turn: the events route from a cursor, the client rule, 410s followed."""

    def __init__(self, c: Client, session_id: str, turn_id: str, seen: list[dict[str, Any]] | None = None,
                 timeout: float = 60):
        """``seen``: the events the client already had (it holds the last one's cursor)."""
        super().__init__(daemon=True)
        self.c, self.session_id, self.timeout = c, session_id, timeout
        self.view = TurnView(turn_id)
        self.events: list[dict[str, Any]] = list(seen or [])
        for event in self.events:
            self.view.apply(event)
        self.after = self.events[-1]["cursor"] if self.events else 0
        self.gone: list[str] = []
        self.cursors_ok = True

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.view.done and time.monotonic() < deadline:
            try:
                r = self.c.events(self.session_id, self.after, wait=1.0)
            except Exception:  # noqa: BLE001 - the API restarting its connections: try again
                time.sleep(0.2)
                continue
            if r.status_code == 410:
                message = r.json()["error"]["message"]
                self.gone.append(message)
                match = READ_ON.search(message)
                assert match, message  # a 410 says where to read on
                self.after = int(match.group(1))
                continue
            if r.status_code != 200:
                time.sleep(0.2)  # Redis away: 503, try again
                continue
            body = r.json()
            for event in body["data"]:
                if self.events and event["cursor"] <= self.events[-1]["cursor"] and not self.gone:
                    self.cursors_ok = False
                self.events.append(event)
                self.view.apply(event)
            self.after = body["next"]


def _own_stack(settings: Settings, tmp_path: Path, redis_url: str | None = None,
               **env: str) -> tuple[Deployment, Procs, str]:
    url = fresh_database()
    changes: dict[str, Any] = {"redis_url": redis_url} if redis_url else {}
    own = own_settings(settings, url, **changes)
    procs = Procs(own, tmp_path)
    return deploy(procs, own, worker=False, **NO_RATE_LIMIT, **env), procs, url


def test_a_worker_frozen_past_its_lease_streams_nothing_when_it_wakes(settings: Settings, tmp_path: Path) -> None:
    d, procs, url = _own_stack(settings, tmp_path)
    try:
        c = d.client()
        frozen = d.worker()
        sid = c.session("paced")
        turn = c.start(sid, "say 240")  # six seconds of streaming
        follower = Follower(c, sid, turn["id"])
        follower.start()
        first = c.wait_event(sid, is_("message.delta", step=0))
        kill_group(frozen, signal.SIGSTOP)  # frozen mid-step, its buffer filling
        d.worker()
        retry = c.wait_event(sid, is_("step.retrying", step=0), after=first["cursor"], timeout=30)
        time.sleep(1.0)
        kill_group(frozen, signal.SIGCONT)  # it wakes past its lease, with deltas to flush
        done = c.wait_turn(turn["id"], timeout=40)
        follower.join(30)
        assert done["status"] == "completed", done
        events = c.all_events(sid)
        stale = [e for e in events if e["cursor"] > retry["cursor"] and e["turn_id"] == turn["id"]
                 and e["data"].get("attempt") == 1]
        assert stale == [], stale  # nothing of the frozen attempt after the takeover wrote
        # Every event of the step names its step and attempt.
        assert all("step" in e["data"] and "attempt" in e["data"] for e in events
                   if e["type"].startswith(("message.", "step.", "tool.")))
        assert follower.view.text == done["output"] and follower.view.stale == 0
        assert [e["type"] for e in events].count("step.completed") == 1
        time.sleep(1.5)  # and nothing trickles in after the end either
        assert c.all_events(sid)[-1]["type"] == "turn.completed"
    finally:
        kill_group(frozen, signal.SIGCONT)
        procs.stop_all()
        drop_database(url)


@pytest.mark.parametrize("data", ["snapshot", "empty"])
@pytest.mark.parametrize("when", ["mid_turn", "at_commit"])
def test_redis_restart_every_client_ends_exact(settings: Settings, tmp_path: Path, data: str, when: str) -> None:
    """Redis comes back from an older snapshot, or empty; mid-turn, or after the turn ended while it was away."""
    server = OwnRedis(tmp_path)
    server.start()
    d, procs, url = _own_stack(settings, tmp_path, server.url, STEPRUN_LOST_TASK_SECONDS="3")
    try:
        d.worker()
        c = d.client()
        runs = []
        for i in range(3):
            sid = c.session("streamer")
            turn = c.start(sid, f"add {i} and {i + 10}")
            runs.append((sid, turn["id"]))
        # Step 1 of the first turn streams (step 0 of the others is done or going).
        c.wait_event(runs[0][0], is_("message.delta", step=0 if when == "mid_turn" else 1), timeout=30)
        if data == "snapshot":
            server.snapshot()
        time.sleep(0.6)  # events after the snapshot: lost in the restore, their cursors held by clients
        followers = []
        for sid, turn_id in runs:
            # Clients holding the newest cursor (the ones a restore reuses) and from the start.
            seen = c.all_events(sid)
            for held in (seen, []):
                followers.append(Follower(c, sid, turn_id, seen=held, timeout=90))
        server.kill()
        if data == "empty":
            server.forget()
        time.sleep(0.5 if when == "mid_turn" else 4.0)  # at_commit: the turns end while Redis is away
        for f in followers:
            f.start()
        server.start()
        for _sid, turn_id in runs:
            done = c.wait_turn(turn_id, timeout=60)
            assert done["status"] == "completed", done
        for f in followers:
            f.join(60)
        for f in followers:
            done = c.turn(f.view.turn_id)
            assert f.view.done, (f.after, f.gone, [e["type"] for e in f.events])  # never silence
            assert f.view.terminal and f.view.terminal["type"] == "turn.completed"
            assert f.view.text == done["output"], (f.gone, f.view.steps)
            assert f.cursors_ok
    finally:
        procs.stop_all()
        server.kill()
        drop_database(url)


def test_defaults_recover_a_lost_message_and_a_killed_worker_in_seconds(settings: Settings, tmp_path: Path) -> None:
    """No tuning: the shipped lease, heartbeat, lost-task threshold and sweep interval."""
    defaults = Settings()
    env = {"STEPRUN_LEASE_SECONDS": str(defaults.lease_seconds),
           "STEPRUN_HEARTBEAT_SECONDS": str(defaults.heartbeat_seconds),
           "STEPRUN_LOST_TASK_SECONDS": str(defaults.lost_task_seconds),
           "STEPRUN_SWEEP_INTERVAL": str(defaults.sweep_interval)}
    d, procs, url = _own_stack(settings, tmp_path, **env)
    try:
        c = d.client()
        # A lost broker message: the step task is deleted from the queue before any worker takes it.
        sid = c.session("streamer")
        turn = c.start(sid, "add 1 and 2")
        client = redis.Redis.from_url(d.settings.redis_url or "")
        deadline = time.monotonic() + 5
        while not client.delete(d.settings.queue_name):
            assert time.monotonic() < deadline, "the step task never reached the broker"
            time.sleep(0.02)
        lost_at = time.time()
        d.worker()
        started = c.wait_event(sid, is_("step.started", step=0), timeout=30)
        assert started["ts"] - lost_at <= 10.0, started["ts"] - lost_at
        assert c.wait_turn(turn["id"], timeout=30)["status"] == "completed"

        # A SIGKILLed worker: its step resumes on another once the lease lapses.
        victim = d.workers[-1]
        sid = c.session("paced")
        turn = c.start(sid, "say 400")
        c.wait_event(sid, is_("message.delta", step=0), timeout=30)
        d.worker()
        killed_at = time.time()
        kill_group(victim)
        retry = c.wait_event(sid, is_("step.retrying", step=0), timeout=30)
        assert retry["ts"] - killed_at <= 10.0, retry["ts"] - killed_at
        print(f"\nwith defaults: lost message resumed in {started['ts'] - lost_at:.2f} s, "
              f"SIGKILL-to-resume {retry['ts'] - killed_at:.2f} s")
        done = c.wait_turn(turn["id"], timeout=40)
        view = TurnView(turn["id"])
        for e in c.all_events(sid):
            view.apply(e)
        assert done["status"] == "completed" and view.text == done["output"]
    finally:
        procs.stop_all()
        drop_database(url)


