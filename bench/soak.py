"""The kill soak: SIGKILL workers N times under a mix of multi-step tool turns and long streams.

``python -m bench.soak [--kills 100] [--interval 3.5] [--in-flight 6]`` (or ``make soak``) starts
the Procfile topology (bench/stack.py) with steprun's default lease, heartbeat, lost-task and
sweep settings, keeps ``--in-flight`` turns running (alternating the three-step ``tools`` agent
and the long ``stream`` agent), each followed by a polling client that applies the client rule
(shared/streaming/view.py) and follows 410s, and SIGKILLs one worker every ``--interval``
seconds (a fresh one replaces it at once). It prints: turns completed / exact, events exact per
the client rule, kill-to-resume p50/p99 (from the kill of each step running in the killed worker to
its next attempt's claim, seen as that attempt's ``step.retrying``), duplicates (checkpoints, messages
or ``step.completed`` of one step held twice), and the longest silence a client saw while its turn
ran. Exits non-zero if any turn was not exact or anything was held twice.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import text

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


def soak(kills: int, interval: float, in_flight: int, workers: int, seed: int, admin_url: str | None = None,
         env: dict[str, str] | None = None) -> int:
    rng = random.Random(seed)
    defaults = Settings()
    config = StackConfig(admin_url=admin_url or StackConfig.admin_url,
                         workers=workers, worker_concurrency=20, lease_seconds=defaults.lease_seconds,
                         agent_options=dict(ttft=0.02, tps=60, words=60, stream_words=1500, stream_tps=300.0),
                         # Every client shares one key: its polling must not be what the soak measures.
                         extra_env={"STEPRUN_RATE_LIMIT_PER_MINUTE": "0", "STEPRUN_RATE_LIMIT_PER_KEY": "0",
                                    "STEPRUN_MAX_RUNNING_TURNS_PER_USER": "0", **(env or {})})
    stack = Stack(config)
    stack.start()
    turns: list[Turn] = []
    kill_times: list[float] = []
    killed: list[Killed] = []
    try:
        env_note = stack.env()
        print(f"soak: {kills} kills every {interval}s, {in_flight} turns in flight, {workers} workers; lease "
              f"{env_note['STEPRUN_LEASE_SECONDS']} s, unclaimed-task {defaults.unclaimed_task_seconds} s, lost-task "
              f"{defaults.lost_task_seconds} s, sweep {defaults.sweep_interval} s, max attempts "
              f"{defaults.max_attempts}" + (f"; changed: {env}" if env else ""), flush=True)
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
            # Read once it is dead: its lease rows are then exactly the steps it died running.
            killed.extend(Killed(kill_times[-1], *row) for row in in_flight_steps(stack, victim.pid))
            stack.start_worker()
            end = time.monotonic() + interval
            while time.monotonic() < end:
                top_up()
                time.sleep(0.1)
            if (k + 1) % 10 == 0:
                print(f"  {k + 1} kills, {len(turns)} turns started", flush=True)
        for t in turns:
            t.join(240)
        return report(stack, turns, kill_times, killed)
    finally:
        stack.stop()


class Killed:
    """A step that was running (held its lease) in a worker when that worker was SIGKILLed."""

    def __init__(self, at: float, turn_id: str, step: int, attempt: int):
        self.at, self.turn_id, self.step, self.attempt = at, turn_id, step, attempt


def in_flight_steps(stack: Stack, pid: int) -> list[tuple[str, int, int]]:
    """(turn id, step, step attempt) of every step whose lease the (dead) worker ``pid`` held."""
    with stack.engine().connect() as conn:
        conn.execute(text("SELECT set_config('steprun.system', 'on', false)"))
        rows = conn.execute(text("SELECT id, step_count, step_attempt FROM turns WHERE lease_owner LIKE :owner"),
                            {"owner": f"%:{pid}"}).all()
    return [(r.id, int(r.step_count), int(r.step_attempt)) for r in rows]


def resumes(turns: list[Turn], killed: list[Killed]) -> tuple[list[tuple[float, Killed]], list[Killed]]:
    """Each killed step's kill-to-resume, and the ones never resumed.

    Resumed is when the next attempt of the step is known to have claimed it: its first event (its
    ``step.retrying``) or, for an attempt killed in turn before it wrote any, that kill (a bound from
    above). A step that committed anyway (its commit landed just before the kill) is left out of both.
    """
    by_id = {t.turn["id"]: t for t in turns}
    later_kills: dict[tuple[str, int], list[Killed]] = {}
    for k in killed:
        later_kills.setdefault((k.turn_id, k.step), []).append(k)
    out: list[tuple[float, Killed]] = []
    never: list[Killed] = []
    for k in killed:
        t = by_id.get(k.turn_id)
        if t is None:
            continue
        mine = [e for e in t.events if e["data"].get("step") == k.step]
        if any(e["type"] == "step.completed" and e["data"].get("attempt") == k.attempt for e in mine):
            continue
        seen = [e["ts"] for e in mine if e["data"].get("attempt", 0) > k.attempt]
        seen += [o.at for o in later_kills[(k.turn_id, k.step)] if o.attempt > k.attempt]
        if not seen:
            never.append(k)
        else:
            out.append((min(seen) - k.at, k))
    return out, never


def history(t: Turn, kill_times: list[float], killed: list[Killed]) -> str:
    """A turn's attempts as a client saw them, with the kills in between (seconds from the turn's first event).

    ``KILL(s0 a2)``: a kill of the worker running that attempt of the turn; ``kill``: of another worker.
    """
    if not t.events:
        return "no events"
    t0 = t.events[0]["ts"]
    mine = {k.at: f"KILL(s{k.step} a{k.attempt})" for k in killed if k.turn_id == t.turn["id"]}
    marks = [(e["ts"], f"{e['type']}(s{e['data'].get('step')} a{e['data'].get('attempt')})") for e in t.events
             if e["type"] in ("step.started", "step.retrying", "step.completed") or e["type"].startswith("turn.")]
    marks += [(k, mine.get(k, "kill")) for k in kill_times if t0 - 1 <= k <= t.events[-1]["ts"]]
    return " ".join(f"{ts - t0:.1f}:{what}" for ts, what in sorted(marks))


def duplicates(stack: Stack) -> dict[str, int]:
    """What a turn must hold once and holds more than once: checkpoints and messages per step, tool results."""
    queries = {
        "checkpoints": "SELECT count(*) FROM (SELECT 1 FROM checkpoints GROUP BY turn_id, step "
                       "HAVING count(*) > 1) d",
        "assistant messages": "SELECT count(*) FROM (SELECT 1 FROM messages WHERE role = 'assistant' "
                              "GROUP BY turn_id, step HAVING count(*) > 1) d",
        "tool messages": "SELECT count(*) FROM (SELECT 1 FROM messages WHERE role = 'tool' "
                         "GROUP BY turn_id, tool_call_id HAVING count(*) > 1) d",
    }
    with stack.engine().connect() as conn:
        conn.execute(text("SELECT set_config('steprun.system', 'on', false)"))
        return {name: int(conn.execute(text(sql)).scalar() or 0) for name, sql in queries.items()}


def tool_reruns(stack: Stack) -> int:
    with stack.engine().connect() as conn:
        return int(conn.execute(text("SELECT coalesce(sum(runs - 1), 0) FROM tool_calls")).scalar() or 0)


def report(stack: Stack, turns: list[Turn], kill_times: list[float], killed: list[Killed]) -> int:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {stack.key}"
    completed = exact = events_exact = 0
    statuses: dict[str, int] = {}
    reasons: list[str] = []
    gaps: list[tuple[float, str]] = []
    for t in turns:
        final = http.get(f"{stack.url}/v1/turns/{t.turn['id']}", timeout=30).json()
        completed += final["status"] == "completed"
        statuses[final["status"]] = statuses.get(final["status"], 0) + 1
        if final["status"] != "completed":
            reasons.append(f"{final['status']}: {(final.get('error') or {}).get('message', '')[:160]}")
        exact += final["status"] == "completed" and t.view.text == final["output"]
        events_exact += t.view.done and t.view.stale == 0 and t.in_order and t.view.text == final["output"]
        gaps.append(t.longest_gap())
    total = len(turns)
    slow = sorted((r for t in turns for r in t.slow_reads), reverse=True)
    if slow:
        print(f"slow or failed event reads: {len(slow)}; worst: " + ", ".join(f"{s:.1f} s {o}" for s, o in slow[:5]))
    print(f"turns: {total} started, {completed} completed, {exact} exact (text == output)")
    if reasons:
        print(f"statuses: {statuses}; not completed: " + " | ".join(reasons[:5]))
        for t in turns:
            if t.view.terminal is None or t.view.terminal["type"] != "turn.completed":
                print(f"  {t.turn['id']}: {history(t, kill_times, killed)}")
    print(f"events exact per the client rule (in order, nothing stale, terminal seen, text exact): "
          f"{events_exact}/{total}")
    resumed, never = resumes(turns, killed)
    waits = [w for w, _ in resumed]
    print(f"kills: {len(kill_times)}; steps running in the killed workers: {len(killed)}, resumed: {len(resumed)}, "
          f"never resumed: {len(never)}; kill-to-resume p50 {pct(waits, 50):.2f} s, p99 {pct(waits, 99):.2f} s, "
          f"max {max(waits, default=0):.2f} s")
    by_id = {t.turn["id"]: t for t in turns}
    for wait, k in sorted(resumed, key=lambda r: r[0], reverse=True)[:3]:
        if wait > 8:
            print(f"  slow resume {wait:.2f} s: turn {k.turn_id} step {k.step} attempt {k.attempt}: "
                  f"{history(by_id[k.turn_id], kill_times, killed)}")
    per_step: dict[tuple[str, int], int] = {}
    for t in turns:
        for e in t.events:
            if e["type"] == "step.completed":
                key = (t.turn["id"], e["data"].get("step"))
                per_step[key] = per_step.get(key, 0) + 1
    dups = {"step.completed events": sum(1 for n in per_step.values() if n > 1), **duplicates(stack)}
    print("duplicates (steps or calls held more than once): "
          + ", ".join(f"{name} {count}" for name, count in dups.items())
          + f"; tool executions beyond the first (a kill while the tool ran): {tool_reruns(stack)}")
    errors: dict[int, int] = {}
    for t in turns:
        for code, count in t.errors.items():
            errors[code] = errors.get(code, 0) + count
    print(f"event reads answered other than 200/410: {errors or 'none'}")
    sweeps = "\n".join(p.log() for p in stack.procs if p.name == "scheduler")
    print(f"scheduler re-sends: {sweeps.count('lease expired during step')} after a lease lapsed, "
          f"{sweeps.count('not in the queue; re-enqueued')} unclaimed tasks not in the queue (taken by a worker "
          f"killed before it claimed them, or lost), {sweeps.count('no worker took step')} past the lost-task "
          "threshold")
    print(f"410s told to clients: {sum(t.gone for t in turns)}; empty reads in a row, longest: "
          f"{max((t.empty_run for t in turns), default=0)}")
    print(f"longest pause between a client's reads: {max((t.poll_gap for t in turns), default=0):.2f} s")
    worst = max(gaps, default=(0.0, ""))
    longest = [g for g, _ in gaps]
    print(f"longest client-visible gap: {worst[0]:.2f} s, {worst[1]} (each turn's longest: median "
          f"{statistics.median(longest) if longest else 0:.2f} s, p99 {pct(longest, 99):.2f} s)")
    dump = Path(stack.tmp) / "soak-events.json"
    dump.write_text(json.dumps({"kills": kill_times, "killed": [vars(k) for k in killed],
                                "turns": [{"id": t.turn["id"], "events": t.events} for t in turns]}))
    return 0 if exact == completed == events_exact == total and not any(dups.values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=100, help="worker SIGKILLs (default 100)")
    p.add_argument("--interval", type=float, default=3.5, help="seconds between kills")
    p.add_argument("--in-flight", type=int, default=6, help="turns kept running")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=20)
    p.add_argument("--admin-url", default=None,
                   help="the Postgres server to make the run's database on (default: this machine's, "
                        f"{StackConfig.admin_url})")
    p.add_argument("--env", action="append", default=[], metavar="STEPRUN_X=VALUE",
                   help="a setting of every served process other than its default (repeatable)")
    a = p.parse_args(argv)
    env = dict(item.split("=", 1) for item in a.env)
    return soak(a.kills, a.interval, a.in_flight, a.workers, a.seed, a.admin_url, env)


if __name__ == "__main__":
    raise SystemExit(main())
