"""Side effects exactly once, under SIGKILL: real workers killed at the worst moments, again and again.

The ``shop`` agent (tests/support/agents_journal.py) has a model that invents new
tool call ids and nonces on every call, a non-idempotent ``charge`` and an
idempotent ``reserve``; both record each execution in ``chaos_effects``. The
workers SIGKILL themselves at random:

- after a tool's side effect, before its result is recorded;
- after its result is recorded, before the step commits (or the next tool runs);
- after the model's response is recorded with its first tool call's start, before
  that tool runs (its outcome is then unknown: the charge pauses the turn).

A test client plays the user: it resolves each ``tool_outcome_unknown`` pause the
way an operator would, by looking at the provider (the effects table): ``skip``
if the charge went through, ``retry`` if it did not. The run stops starting turns
after CHAOS_KILLS kills (default 50), then drains; ``pytest -s`` prints the counts.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from shared.settings import Settings
from tests.support.processes import Proc, Procs
from tests.support.recovery_support import Client, Deployment, deploy, drop_database, fresh_database, own_settings

KILLS = int(os.environ.get("CHAOS_KILLS", "50"))
TIMEOUT = float(os.environ.get("CHAOS_TIMEOUT", str(max(240.0, KILLS * 6.0))))
WORKERS = 3
CONCURRENT_TURNS = 10

CHAOS_TABLES = """
CREATE TABLE chaos_effects (id serial PRIMARY KEY, tool text, turn_id text, step int, call_id text,
                            idempotency_key text, nonce text, at timestamptz DEFAULT now());
CREATE TABLE chaos_kills (id serial PRIMARY KEY, turn_id text, call_id text, tool text, moment text, pid int,
                          at timestamptz DEFAULT now());
"""


@pytest.fixture
def chaos(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, Any]]:
    url = fresh_database()
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg2://"))
    with engine.begin() as conn:
        for statement in filter(str.strip, CHAOS_TABLES.split(";")):
            conn.execute(text(statement))
    # Short leases, so that a dead worker's step resumes quickly (each kill costs about one lease).
    own = own_settings(settings, url, lease_seconds=1.5, heartbeat_seconds=0.3, sweep_interval=0.3,
                       lost_task_seconds=3.0)
    procs = Procs(own, tmp_path_factory.mktemp("chaos"))
    try:
        d = deploy(procs, own, worker=False, STEPRUN_AGENTS="tests.support.agents_journal",
                   STEPRUN_RATE_LIMIT_PER_MINUTE="0", STEPRUN_RATE_LIMIT_PER_KEY="0", STEPRUN_MAX_ATTEMPTS="40",
                   STEPRUN_MAX_QUEUED_TURNS="100",
                   STEPRUN_MAX_RUNNING_TURNS_PER_USER="0",
                   CHAOS_DATABASE_URL=url, CHAOS_KILL_AFTER_EFFECT="0.22", CHAOS_KILL_AFTER_RECORD="0.15",
                   CHAOS_KILL_AFTER_MODEL="0.1", CHAOS_MAX_KILLS_PER_CALL="2")
        yield d, engine
    finally:
        procs.stop_all()
        engine.dispose()
        drop_database(url)


def _rows(engine: Any, sql: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql)).all())


def test_sigkill_at_the_worst_moments_runs_no_side_effect_twice(chaos: tuple[Deployment, Any]) -> None:
    d, engine = chaos
    c: Client = d.client()
    workers: list[Proc] = [d.worker() for _ in range(WORKERS)]
    started = time.monotonic()
    deaths = 0
    active: dict[str, str] = {}  # turn id -> session id
    finished: dict[str, dict[str, Any]] = {}
    surfaced: dict[str, str] = {}  # call id -> what the "operator" chose
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for i, proc in enumerate(workers):
            if proc.popen.poll() is not None:
                deaths += 1
                proc.kill()
                # Not waiting for it to be ready: the others keep working meanwhile.
                workers[i] = d.procs.worker(env=d.env, wait=False)
        if deaths < KILLS and len(active) < CONCURRENT_TURNS:
            sid = c.session("shop")
            active[c.start(sid, "buy two rounds")["id"]] = sid
        for turn_id in list(active):
            r = c.get(f"/v1/turns/{turn_id}")
            if r.status_code != 200:
                continue  # a web hiccup: look again next round
            turn = r.json()
            if turn["status"] == "requires_action":
                _resolve(c, engine, turn, surfaced)
            elif turn["status"] not in ("queued", "in_progress"):
                finished[turn_id] = turn
                del active[turn_id]
        if deaths >= KILLS and not active:
            break
        time.sleep(0.2)
    assert not active, f"turns still running after {TIMEOUT:.0f} s: {sorted(active)} ({deaths} kills)"

    kills = Counter(f"{tool} {moment}" for tool, moment in _rows(engine, "SELECT tool, moment FROM chaos_kills"))
    effects = _rows(engine, "SELECT tool, turn_id, step, call_id, idempotency_key, nonce FROM chaos_effects")
    charges = [e for e in effects if e.tool == "charge"]
    per_charge = Counter((e.turn_id, e.step) for e in charges)
    duplicates = sum(n - 1 for n in per_charge.values() if n > 1)
    reserves: dict[tuple[str, int], list[Any]] = {}
    for e in effects:
        if e.tool == "reserve":
            reserves.setdefault((e.turn_id, e.step), []).append(e)
    reruns = sum(len(v) - 1 for v in reserves.values())
    key_changes = sum(1 for v in reserves.values() if len({(e.idempotency_key, e.nonce) for e in v}) > 1)
    killed_after_charge = {r.call_id for r in _rows(
        engine, "SELECT call_id FROM chaos_kills WHERE tool = 'charge' AND moment = 'after_effect'")}
    events = [e for sid in {t["session_id"] for t in finished.values()} for e in c.all_events(sid)]
    unknown_events = {e["data"]["id"] for e in events if e["type"] == "tool.outcome_unknown"
                      and e["data"]["policy"] == "pause"}
    replays = sum(1 for e in events if e["type"] == "model.replayed")
    journal = Counter(e["data"].get("journal") for e in events if e["type"] == "tool.result")
    statuses = Counter(t["status"] for t in finished.values())
    print(f"\nchaos in {time.monotonic() - started:.0f} s: {deaths} worker SIGKILLs ({dict(kills)}), "
          f"{len(finished)} turns {dict(statuses)}; "
          f"charge: {len(charges)} executions, {duplicates} duplicates; unknown outcomes surfaced: "
          f"{len(surfaced)} (kills right after a charge: {len(killed_after_charge)}; operator chose "
          f"{dict(Counter(surfaced.values()))}); reserve: {reruns} re-runs, {key_changes} with another key; "
          f"model responses reused: {replays}; tool results by journal: {dict(journal)}")

    assert deaths >= KILLS
    assert duplicates == 0, sorted(k for k, n in per_charge.items() if n > 1)
    # Every charge a worker died right after was surfaced to the user, as an event and as the pause's reason.
    assert killed_after_charge <= set(surfaced), killed_after_charge - set(surfaced)
    assert set(surfaced) <= unknown_events
    # The idempotent tool ran again only under the key (and with the arguments) of its first run.
    assert key_changes == 0
    assert statuses == Counter(completed=len(finished)), statuses
    # Every turn ran its two rounds: two charges each, none lost, none doubled.
    assert sorted(per_charge.values()) == [1] * (2 * len(finished))
    left_started = _rows(engine, "SELECT count(*) FROM tool_calls WHERE status = 'started'")[0][0]
    assert left_started == 0


def _resolve(c: Client, engine: Any, turn: dict[str, Any], surfaced: dict[str, str]) -> None:
    """Answer a tool_outcome_unknown pause as an operator would: did the charge reach the provider?"""
    pending = turn["pending"] or {}
    assert pending.get("reason") == "tool_outcome_unknown", pending
    for unknown in pending["unknown"]:
        assert unknown["name"] == "charge", unknown  # an idempotent tool never pauses
        happened = _rows(engine, f"SELECT count(*) FROM chaos_effects WHERE call_id = '{unknown['id']}'")[0][0]
        choice = "skip" if happened else "retry"
        surfaced[unknown["id"]] = choice
        r = c.post(f"/v1/turns/{turn['id']}/resume", {"tool_outcome": choice})
        assert r.status_code in (202, 409), r.text  # 409: an earlier poll's resume already went through
