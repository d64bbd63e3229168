"""Scenarios that kill or replace workers: recovery after SIGKILL, and Celery's --autoscale.

These run in the orchestrator itself (threads, no load generator): one
streaming client per trial is all they need.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import text

from bench.client import Http, create_session, open_stream, start_turn
from bench.runner import Progress
from bench.stack import Stack

TERMINAL = {"turn.completed", "turn.failed", "turn.cancelled", "turn.expired", "turn.incomplete"}


class Follower:
    """Reads a session's stream in a thread and timestamps every event on arrival."""

    def __init__(self, stack: Stack, session_id: str, prefer: str):
        self.stream = open_stream(stack.url, stack.key, session_id, after=0, prefer=prefer)
        self.kind = self.stream.kind
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for event in self.stream.events():
                with self._cond:
                    self.events.append((time.time(), event))
                    self._cond.notify_all()
        except Exception:  # noqa: BLE001 - the socket is closed at the end of the trial
            pass

    def wait_for(self, timeout: float, **match: Any) -> tuple[float, dict[str, Any]] | None:
        """The first event (so far or to come) whose fields equal ``match``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, e in self.events:
                    if all(e.get(k) == v for k, v in match.items()):
                        return t, e
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def after(self, since: float, timeout: float, **match: Any) -> tuple[float, dict[str, Any]] | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, e in self.events:
                    if t >= since and all(e.get(k) == v for k, v in match.items()):
                        return t, e
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def close(self) -> None:
        self.stream.close()


def recovery(stack: Stack, opts: Any, progress: Progress) -> dict[str, Any]:
    """SIGKILL the worker running a step mid-stream; time until the client sees step.retrying."""
    lease, beat = stack.config.lease_seconds, max(0.5, stack.config.lease_seconds / 5)
    http = Http(stack.url, stack.key)
    trials = []
    for i in range(opts.recovery_trials):
        session_id = create_session(http, "slow")
        follower = Follower(stack, session_id, opts.stream)
        turn_id = start_turn(http, session_id, "stream slowly")["id"]
        first = follower.wait_for(20, type="message.delta", turn_id=turn_id)
        if first is None:
            raise RuntimeError("recovery: the slow turn never streamed")
        # Kill at a different point of the heartbeat cycle in each trial.
        time.sleep(beat * (i + 0.5) / opts.recovery_trials)
        with stack.engine().connect() as conn:
            owner = conn.execute(text("SELECT lease_owner FROM turns WHERE id = :id"), {"id": turn_id}).scalar()
        pid = int(str(owner).rsplit(":", 1)[1])
        victim = next(w for w in stack.workers if w.pid == pid)
        killed_at = time.time()
        stack.kill_worker(victim)
        if not stack.workers:  # someone must be left to take the step over, as a process manager would
            stack.start_worker()
        progress.show(f"[recovery] trial {i + 1}: killed worker {pid}, waiting for step.retrying", force=True)
        retry = follower.after(killed_at, lease + 30, type="step.retrying", turn_id=turn_id)
        resumed = follower.after(killed_at if retry is None else retry[0], 10, type="message.delta",
                                 turn_id=turn_id)
        http.request("POST", f"/v1/turns/{turn_id}/cancel")
        follower.wait_for(10, type="turn.cancelled", turn_id=turn_id)
        follower.close()
        trial = dict(retrying_after=None if retry is None else round(retry[0] - killed_at, 2),
                     first_delta_after=None if resumed is None else round(resumed[0] - killed_at, 2),
                     attempt=None if retry is None else retry[1]["data"].get("attempt"))
        trials.append(trial)
        progress.done(f"[recovery] trial {i + 1}: step.retrying {trial['retrying_after']}s after SIGKILL, "
                      f"first new delta {trial['first_delta_after']}s (lease {lease:g}s, heartbeat {beat:g}s)")
        if i < opts.recovery_trials - 1 or "autoscale" in opts.scenario_list:
            while len(stack.workers) < stack.config.workers:
                stack.start_worker()
    http.close()
    seen = [t["retrying_after"] for t in trials if t["retrying_after"] is not None]
    return dict(trials=trials, lease=lease, heartbeat=beat, sweep_interval=2.0, target=lease + 2.0,
                max=max(seen, default=None), mean=round(sum(seen) / len(seen), 2) if seen else None,
                missed=len(trials) - len(seen), stream=follower.kind)


def autoscale(stack: Stack, opts: Any, progress: Progress) -> dict[str, Any]:
    """Does `celery worker -P gevent --autoscale=MAX,MIN` (prefetch 1) grow when steps pile up?"""
    hi, lo = opts.autoscale_max, opts.autoscale_min
    for w in list(stack.workers):
        stack.kill_worker(w)
    worker = stack.start_worker(autoscale=f"{hi},{lo}")
    http = Http(stack.url, stack.key)
    turns = [start_turn(http, create_session(http, "slow"), "stream slowly")["id"] for _ in range(hi + lo)]
    samples, started = [], time.time()
    while time.time() - started < opts.autoscale_seconds:
        with stack.engine().connect() as conn:
            running = conn.execute(text(
                "SELECT count(*) FROM turns WHERE status = 'in_progress' AND lease_expires_at >= now()")).scalar()
        samples.append((round(time.time() - started, 1), int(running or 0)))
        progress.show(f"[autoscale {hi},{lo}] {samples[-1][0]:4.1f}s  running steps={samples[-1][1]} "
                      f"of {len(turns)} sent")
        time.sleep(0.5)
    for turn_id in turns:
        http.request("POST", f"/v1/turns/{turn_id}/cancel")
    http.close()
    log = worker.log()
    stack.kill_worker(worker)
    while len(stack.workers) < stack.config.workers:
        stack.start_worker()
    peak = max((r for _, r in samples), default=0)
    out = dict(max=hi, min=lo, sent=len(turns), seconds=opts.autoscale_seconds, peak_running=peak,
               grew=peak > lo, scaling_log_lines=[ln for ln in log.splitlines() if "cal" in ln.lower()
                                                  and "autoscal" in ln.lower()][:5],
               timeline=samples[:: max(1, len(samples) // 12)])
    progress.done(f"[autoscale] --autoscale={hi},{lo} with prefetch 1 on gevent: peak {peak} steps running "
                  f"of {len(turns)} sent in {opts.autoscale_seconds:g}s -> {'grew' if out['grew'] else 'did NOT grow'}")
    return out
