"""The kill soak: SIGKILL workers N times under a mix of multi-step tool turns and long streams.

``python -m bench.soak [--kills 100] [--interval 3.5] [--in-flight 6]`` (or ``make soak``) starts
the Procfile topology (bench/stack.py) with steprun's default lease, heartbeat, lost-task and
sweep settings, keeps ``--in-flight`` turns running (alternating the three-step ``tools`` agent
and the long ``stream`` agent), each followed by a polling client that applies the client rule
(shared/streaming/view.py) and follows 410s, and SIGKILLs one worker every ``--interval``
seconds (a fresh one replaces it at once). It prints: turns completed / exact, events exact per
the client rule, kill-to-resume p50/p99 (a kill to each killed step's ``step.retrying``), and the
longest silence a client saw while its turn ran. Exits non-zero if any turn was not exact.
"""
from __future__ import annotations

import argparse
import random
import re
import statistics
import threading
import time
from typing import Any

import requests

from bench.stack import Stack, StackConfig
from shared.settings import Settings
from shared.streaming.view import TurnView

READ_ON = re.compile(r"after=(\d+)")


class Turn(threading.Thread):
    """One turn and the client that follows it."""

    def __init__(self, url: str, key: str, agent: str, text: str, timeout: float):
        super().__init__(daemon=True)
        self.url, self.timeout = url, timeout
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"
        self.sid = self._post(f"{url}/v1/sessions", {"agent": agent})["id"]
        self.turn = self._post(f"{url}/v1/sessions/{self.sid}/turns", {"input": text})
        self.view = TurnView(self.turn["id"])
        self.events: list[dict[str, Any]] = []
        self.arrivals: list[float] = []
        self.in_order = True
        self.gone = 0
        # Reads of the events route that took over 5 s (it long-polls 2 s), or failed: (seconds, outcome).
        self.slow_reads: list[tuple[float, str]] = []
        # The longest time between two reads this client started (the client's own stalls).
        self.poll_gap, self._last_poll = 0.0, 0.0
        self.empty_run = self._empty = 0
        self.errors: dict[int, int] = {}

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST, retrying a 5xx or a dropped connection (bounded: 10 tries)."""
        for _ in range(10):
            try:
                r = self.http.post(url, json=body, timeout=30)
            except requests.RequestException:
                time.sleep(0.5)
                continue
            if r.status_code < 500:
                assert r.status_code in (200, 201, 202), r.text
                return dict(r.json())
            time.sleep(0.5)
        raise RuntimeError(f"POST {url} kept failing")

    def run(self) -> None:
        after, deadline = 0, time.monotonic() + self.timeout
        while not self.view.done and time.monotonic() < deadline:
            asked = time.monotonic()
            if self._last_poll:
                self.poll_gap = max(self.poll_gap, asked - self._last_poll)
            self._last_poll = asked
            try:
                r = self.http.get(f"{self.url}/v1/sessions/{self.sid}/events",
                                  params={"after": after, "wait": 2}, timeout=30)
            except requests.RequestException as exc:
                self.slow_reads.append((time.monotonic() - asked, type(exc).__name__))
                time.sleep(0.2)
                continue
            if time.monotonic() - asked > 5:
                self.slow_reads.append((time.monotonic() - asked, str(r.status_code)))
            if r.status_code == 410:
                self.gone += 1
                match = READ_ON.search(r.json()["error"]["message"])
                after = int(match.group(1)) if match else after
                continue
            if r.status_code != 200:
                self.errors[r.status_code] = self.errors.get(r.status_code, 0) + 1
                time.sleep(0.2)
                continue
            body = r.json()
            self._empty = 0 if body["data"] else self._empty + 1
            self.empty_run = max(self.empty_run, self._empty)
            now = time.time()
            for event in body["data"]:
                if self.events and event["cursor"] <= self.events[-1]["cursor"]:
                    self.in_order = False
                self.events.append(event)
                self.arrivals.append(now)
                self.view.apply(event)
            after = body["next"]

    def longest_gap(self) -> tuple[float, str]:
        """The longest silence between two events of this turn while it ran, and what it was between."""
        best, where = 0.0, ""
        for i in range(1, len(self.arrivals)):
            gap = self.arrivals[i] - self.arrivals[i - 1]
            if gap > best:
                a, b = self.events[i - 1], self.events[i]
                best, where = gap, (f"{a['type']} (step {a['data'].get('step')}) -> {b['type']} "
                                    f"(step {b['data'].get('step')}, attempt {b['data'].get('attempt')}; "
                                    f"{b['ts'] - a['ts']:.2f} s apart as written)")
        return best, where


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def soak(kills: int, interval: float, in_flight: int, workers: int, seed: int) -> int:
    rng = random.Random(seed)
    defaults = Settings()
    config = StackConfig(workers=workers, worker_concurrency=20, lease_seconds=defaults.lease_seconds,
                         agent_options=dict(ttft=0.02, tps=60, words=60, stream_words=1500, stream_tps=300.0),
                         # Every client shares one key: its polling must not be what the soak measures.
                         extra_env={"STEPRUN_RATE_LIMIT_PER_MINUTE": "0", "STEPRUN_RATE_LIMIT_PER_KEY": "0",
                                    "STEPRUN_MAX_RUNNING_TURNS_PER_USER": "0"})
    stack = Stack(config)
    stack.start()
    turns: list[Turn] = []
    kill_times: list[float] = []
    try:
        env_note = stack.env()
        print(f"soak: {kills} kills every {interval}s, {in_flight} turns in flight, {workers} workers; lease "
              f"{env_note['STEPRUN_LEASE_SECONDS']} s, lost-task {defaults.lost_task_seconds} s, sweep "
              f"{defaults.sweep_interval} s", flush=True)
        n = 0

        def top_up() -> None:
            nonlocal n
            while sum(1 for t in turns if not t.view.done and t.is_alive()) < in_flight:
                agent = "tools" if n % 2 == 0 else "stream"
                t = Turn(stack.url, stack.key, agent, f"soak {n}", timeout=300)
                t.start()
                turns.append(t)
                n += 1

        top_up()
        time.sleep(1.0)
        for k in range(kills):
            victim = rng.choice(stack.workers)
            kill_times.append(time.time())
            stack.kill_worker(victim)
            stack.start_worker()
            end = time.monotonic() + interval
            while time.monotonic() < end:
                top_up()
                time.sleep(0.1)
            if (k + 1) % 10 == 0:
                print(f"  {k + 1} kills, {len(turns)} turns started", flush=True)
        for t in turns:
            t.join(240)
        return report(stack, turns, kill_times)
    finally:
        stack.stop()


def report(stack: Stack, turns: list[Turn], kill_times: list[float]) -> int:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {stack.key}"
    completed = exact = events_exact = 0
    statuses: dict[str, int] = {}
    reasons: list[str] = []
    resumes: list[float] = []
    gaps: list[float] = []
    for t in turns:
        final = http.get(f"{stack.url}/v1/turns/{t.turn['id']}", timeout=30).json()
        completed += final["status"] == "completed"
        statuses[final["status"]] = statuses.get(final["status"], 0) + 1
        if final["status"] != "completed":
            reasons.append(f"{final['status']}: {(final.get('error') or {}).get('message', '')[:160]}")
        exact += final["status"] == "completed" and t.view.text == final["output"]
        events_exact += t.view.done and t.view.stale == 0 and t.in_order and t.view.text == final["output"]
        gaps.append(t.longest_gap())
        for e in t.events:
            if e["type"] == "step.retrying" and "lease" in e["data"].get("reason", ""):
                # The kill that ended the dead attempt: the first after its last event.
                step, dead = e["data"]["step"], e["data"]["attempt"] - 1
                last = max((x["ts"] for x in t.events if x["data"].get("step") == step
                            and x["data"].get("attempt") == dead), default=None)
                after = [k for k in kill_times if last is not None and last - 0.3 <= k <= e["ts"]]
                if after:
                    resumes.append(e["ts"] - after[0])
    total = len(turns)
    slow = sorted((r for t in turns for r in t.slow_reads), reverse=True)
    if slow:
        print(f"slow or failed event reads: {len(slow)}; worst: " + ", ".join(f"{s:.1f} s {o}" for s, o in slow[:5]))
    print(f"turns: {total} started, {completed} completed, {exact} exact (text == output)")
    if reasons:
        print(f"statuses: {statuses}; not completed: " + " | ".join(reasons[:5]))
    print(f"events exact per the client rule (in order, nothing stale, terminal seen, text exact): "
          f"{events_exact}/{total}")
    print(f"kills: {len(kill_times)}; killed steps resumed: {len(resumes)}; kill-to-resume p50 "
          f"{pct(resumes, 50):.2f} s, p99 {pct(resumes, 99):.2f} s, max {max(resumes, default=0):.2f} s")
    errors: dict[int, int] = {}
    for t in turns:
        for code, count in t.errors.items():
            errors[code] = errors.get(code, 0) + count
    print(f"event reads answered other than 200/410: {errors or 'none'}")
    print(f"410s told to clients: {sum(t.gone for t in turns)}; empty reads in a row, longest: "
          f"{max((t.empty_run for t in turns), default=0)}")
    print(f"longest pause between a client's reads: {max((t.poll_gap for t in turns), default=0):.2f} s")
    worst = max(gaps, default=(0.0, ""))
    print(f"longest client-visible gap: {worst[0]:.2f} s, {worst[1]} "
          f"(median of each turn's longest: {statistics.median(g for g, _ in gaps) if gaps else 0:.2f} s)")
    return 0 if exact == completed == events_exact == total else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=100, help="worker SIGKILLs (default 100)")
    p.add_argument("--interval", type=float, default=3.5, help="seconds between kills")
    p.add_argument("--in-flight", type=int, default=6, help="turns kept running")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=20)
    a = p.parse_args(argv)
    return soak(a.kills, a.interval, a.in_flight, a.workers, a.seed)


if __name__ == "__main__":
    raise SystemExit(main())
