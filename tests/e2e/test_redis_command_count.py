"""What a turn costs in Redis commands, through the real path: a count, so it cannot creep up.

The web process and the Celery worker (as the Procfile runs them) share a
redis-server of this test's own (tests/support/redis_counter.py), so ``INFO
commandstats`` counts their commands alone, a Lua script's inner commands
included. A client POSTs a turn and long-polls ``GET /v1/turns/{id}?wait=`` until
it ends (the polling shape), or follows the session's WebSocket while it runs;
the count is every command either process sent for it, taken once both have gone
quiet; the delta flush interval is set long (1 s), so how many appends a step
makes does not depend on the machine's load. Not counted: the worker's blocking read of the queue (BRPOP), which it
re-sends every second while idle as well, so its number depends on time, not on
turns (one returns the turn's task: one per step). No scheduler runs: its sweeps
are per interval, not per turn.

Some commands are per interval, not per turn: a rate-limit bucket's EXPIRE (once
per bucket and minute), a session log's TTL (four PEXPIREs per session, process
and minute): the pin applies to the cheaper of two turns, so a window rolling over
inside one of them does not fail the test. The open WebSocket's stream slot is
renewed every third of its lease (one script: TIME, a ZADD and an EXPIRE per set,
a ZREMRANGEBYSCORE per set): the lease is set long here, so no renewal lands in
either counted turn and the two are alike but for a rollover.

Target (issue 15): a single-step turn in at most 25 Redis commands, on both
shapes; a tool turn (a tool call, then the answer) in fewer. Reached on the
WebSocket shape (23); not on the polling one: this pins what is (39 and 52, from
93 and 146), so it cannot creep back up. What a single-step polled turn still
sends (web 26, worker 13):
- the POST: its rate limits (one script: an INCR per user, key and tenant bucket,
  a GET of the address's failed authentications: 5), ``turn.queued`` (one script:
  INCRBY, XADD, PUBLISH: 4), the step's task (LPUSH: 1);
- the GET ?wait=: its rate limits (5), a stream slot (one script: TIME, a ZCOUNT,
  a ZADD and an EXPIRE per user and tenant set: 8; its release, 2 ZREM), the
  log's tail when it starts (XREVRANGE; the turn's end rings with its events,
  so that ring needs no second look);
- the step: its first append (turn.started, step.started, the first delta: the
  script, MGET of fence and cancel flag, INCRBY, one XADD (an append is one stream
  entry, whatever its number of events), PUBLISH: 5), and the commit's, which
  carries the rest of its deltas too (the deltas, step.completed, turn.completed:
  the script, MGET, the fence's close mark, an HMGET and an HSET of the durable
  ids, INCRBY, XADD, and one PUBLISH: 8). An append rings one channel: the
  session's status channel when it adds a durable event, else the session's own;
  a follower listens on both. (Before: the deltas had an append of their own, 5
  more, before the commit took them; each event an XADD of its own, 4 more; a
  durable append rang both channels, 1 more.) The worker's BRPOP that took the
  task is not counted (above).
"""
from __future__ import annotations

import json
import os
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import websocket

from shared.settings import Settings
from tests.support.processes import Procs, create_key_cli, settings_env
from tests.support.redis_counter import IDLE_COMMANDS, PrivateRedis, by_process, group_pids, socket_owners
from tests.support.turns import polled_turn

SINGLE_STEP_TARGET = 25  # issue 15's target
SINGLE_STEP_REACHED = 39  # 26 web + 13 worker (the breakdown above)
TOOL_TURN_REACHED = 52  # 26 web + 26 worker (two steps, the second sent by the worker: LPUSH)
# Followed over the session's WebSocket (opened before the turn, as the bench's clients do): the POST (its
# rate limits, turn.queued, the task), the step, and the relay's read at each ring, one XRANGE from its own
# cursor (44 -> 35, 77 -> 62 when it was an XRANGE, an XREVRANGE and a GET; 35 -> 31, 62 -> 49 once a step's
# last deltas rode its commit's append: one append and one ring fewer a step; 31 -> 27, 49 -> 43 with one XADD
# per append; 27 -> 23, 43 -> 36 once a ring carried its append's events, so the relay takes them from the
# ring instead of reading the log, and an append rang one channel, not two). One more allowed: a ring whose
# events do not follow what the relay holds (one lost, or too large to carry its events) costs one read.
WS_SINGLE_STEP_REACHED = 24
WS_TOOL_TURN_REACHED = 37


@dataclass
class Counted:
    url: str
    headers: dict[str, str]
    redis: PrivateRedis
    procs: Procs

    def owners(self) -> dict[int, str]:
        names: dict[int, str] = {}
        for proc in self.procs.started:
            for port, _ in socket_owners(group_pids(proc.popen.pid)).items():
                names[port] = proc.name
        return names


@pytest.fixture(scope="module")
def counted(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Counted]:
    log_dir = tmp_path_factory.mktemp("rediscount")
    server = PrivateRedis(log_dir).start()
    env = {**settings_env(settings), "REDIS_URL": server.url, "STEPRUN_AGENTS": "tests.support.agents_slow",
           "STEPRUN_LEASE_SECONDS": "60", "STEPRUN_HEARTBEAT_SECONDS": "20",
           "STEPRUN_WORKER_BEAT_SECONDS": "600", "STEPRUN_KEY_CACHE_SECONDS": "600",
           "STEPRUN_STREAM_SLOT_SECONDS": "900",
           # A step's appends, whatever the machine's load: its first delta at once, the rest once the model
           # answered, then the commit's.
           "STEPRUN_DELTA_FLUSH_SECONDS": "1.0"}
    procs = Procs(settings, log_dir)
    try:
        procs.worker(env=env)
        _, url = procs.web(env=env)
        key = create_key_cli(env, f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}", cwd=Path.cwd())
        yield Counted(url, {"Authorization": f"Bearer {key}"}, server, procs)
    finally:
        procs.stop_all()
        server.stop()


def _counted(c: Counted, run: object) -> tuple[int, Counter[str], str]:
    """(commands, per command, what each process sent) of ``run()``, idle polling left out."""
    before, mark = c.redis.settle()
    assert callable(run)
    run()
    after, _ = c.redis.settle()
    diff = Counter({k: after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)})
    for name in IDLE_COMMANDS:
        diff.pop(name, None)
    sent = c.redis.since(mark)
    if os.environ.get("STEPRUN_TEST_REDIS_TRACE"):
        owners = c.owners()
        for cmd in sent:
            who = "lua" if cmd.client == "lua" else owners.get(int(cmd.client.rsplit(":", 1)[1]), cmd.client)
            print(f"    {who:8} {cmd.line[:220]}")
    detail = "\n".join(f"  {who}: {dict(n.most_common())}" for who, n in by_process(sent, c.owners()).items())
    return sum(diff.values()), diff, detail


def _session(c: Counted) -> str:
    r = requests.post(f"{c.url}/v1/sessions", json={"agent": "math"}, headers=c.headers, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _polled_turn(c: Counted, session_id: str, text: str) -> None:
    turn = polled_turn(c.url, c.headers, session_id, text)
    assert turn["status"] == "completed", turn


@pytest.mark.parametrize(("text", "reached"), [("hello there", SINGLE_STEP_REACHED),
                                               ("please add 2 and 3", TOOL_TURN_REACHED)],
                         ids=["single-step", "tool-turn"])
def test_polled_turn_redis_commands(counted: Counted, text: str, reached: int) -> None:
    session_id = _session(counted)
    _polled_turn(counted, session_id, text)  # a process's first turn of its kind loads scripts and connections
    counts = []
    for _ in range(2):  # a later turn of the same session costs the same
        total, per_command, detail = _counted(counted, lambda: _polled_turn(counted, session_id, text))
        print(f"\n{text!r}: {total} commands {dict(per_command.most_common())}\n{detail}")
        counts.append((total, per_command, detail))
    total, per_command, detail = min(counts, key=lambda c: c[0])
    assert total <= reached, f"{total} Redis commands (pinned {reached}): {dict(per_command)}\n{detail}"


def _followed_turn(c: Counted, ws: websocket.WebSocket, session_id: str, text: str) -> None:
    r = requests.post(f"{c.url}/v1/sessions/{session_id}/turns", json={"input": text}, headers=c.headers,
                      timeout=30)
    assert r.status_code == 202, r.text
    turn_id = r.json()["id"]
    while True:
        event = json.loads(ws.recv())
        if event.get("turn_id") == turn_id and event.get("type", "").startswith("turn.") and \
                event["type"] not in ("turn.queued", "turn.started"):
            assert event["type"] == "turn.completed", event
            return


@pytest.mark.parametrize(("text", "reached"), [("hello there", WS_SINGLE_STEP_REACHED),
                                               ("please add 2 and 3", WS_TOOL_TURN_REACHED)],
                         ids=["single-step", "tool-turn"])
def test_followed_turn_redis_commands(counted: Counted, text: str, reached: int) -> None:
    session_id = _session(counted)
    ws_url = "ws" + counted.url[len("http"):] + f"/v1/sessions/{session_id}/ws"
    ws = websocket.create_connection(ws_url, header=[f"Authorization: {counted.headers['Authorization']}"],
                                     timeout=30)
    try:
        _followed_turn(counted, ws, session_id, text)  # the first: scripts loaded, the stream's tail warm
        counts = []
        for _ in range(2):
            total, per_command, detail = _counted(counted, lambda: _followed_turn(counted, ws, session_id, text))
            print(f"\n{text!r} followed: {total} commands {dict(per_command.most_common())}\n{detail}")
            counts.append((total, per_command, detail))
    finally:
        ws.close()
    total, per_command, detail = min(counts, key=lambda c: c[0])
    assert total <= reached, f"{total} Redis commands (pinned {reached}): {dict(per_command)}\n{detail}"
    assert per_command["xrevrange"] == 0 and per_command["get"] <= 2, per_command  # no read saw a gap
