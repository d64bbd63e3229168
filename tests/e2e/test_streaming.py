"""Streaming over WebSocket and SSE, as a client sees it: resumable, fair to slow readers, isolated.

Real processes (gunicorn gevent web, Celery worker, or `steprun dev`), real
Postgres and Redis, loopback only.
"""
from __future__ import annotations

import json
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket

from shared.auth.keys import create_key
from shared.auth.principal import SYSTEM, Principal
from shared.auth.stream_tokens import mint_stream_token
from shared.db import unit_of_work
from shared.runtime import Runtime
from shared.settings import Settings
from tests.support.processes import BIN, Proc, Procs, create_key_cli, free_port, settings_env, wait_http

FINAL = {"turn.completed", "turn.failed", "turn.cancelled", "turn.expired", "turn.incomplete"}


@dataclass
class Streams:
    """A deployment serving tests.support.agents_streaming: two API processes (production) or one (`steprun dev`)."""

    mode: str
    urls: list[str]
    key: str
    env: dict[str, str]
    procs: Procs
    webs: list[Proc] = field(default_factory=list)

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def session(self, agent: str, key: str | None = None, url: str | None = None) -> str:
        r = requests.post(f"{url or self.urls[0]}/v1/sessions", json={"agent": agent}, headers=self.headers(key))
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def new_key(self, tenant: str | None = None, user: str | None = None) -> str:
        """A key for a fresh user, made with `steprun keys create` against this deployment."""
        cwd = {"cwd": Path(self.env["STEPRUN_DATA_DIR"]).parent} if self.mode == "embedded" else {}
        return create_key_cli(self.env, tenant or f"t-{secrets.token_hex(4)}", user or f"u-{secrets.token_hex(4)}",
                              **cwd)

    def turn_done(self, turn_id: str, key: str | None = None) -> dict[str, Any]:
        return requests.get(f"{self.urls[0]}/v1/turns/{turn_id}?wait=60", headers=self.headers(key)).json()


@pytest.fixture(scope="module", params=["production", "embedded"])
def streams(request: pytest.FixtureRequest, settings: Settings,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Streams]:
    log_dir = tmp_path_factory.mktemp(f"streams-{request.param}")
    procs = Procs(settings, log_dir)
    extra = {"STEPRUN_AGENTS": "tests.support.agents_streaming", "STEPRUN_SSE_HEARTBEAT_SECONDS": "0.5"}
    try:
        if request.param == "production":
            env = {**settings_env(settings), **extra}  # with the run's STEPRUN_SECRET_KEY
            procs.worker(concurrency=50, env=env)
            procs.scheduler(env=env)
            webs = [procs.web(env=env), procs.web(env=env)]
            cwd = None
        else:
            workdir = tmp_path_factory.mktemp("streams-embedded")
            # No STEPRUN_SECRET_KEY: `steprun dev` makes its own and keeps it in its data dir.
            env = {k: v for k, v in settings_env(settings).items()
                   if k not in ("DATABASE_URL", "REDIS_URL", "STEPRUN_SECRET_KEY")}
            env.update(extra, STEPRUN_DATA_DIR=str(workdir / ".steprun"))
            port = free_port()
            proc = procs.start("dev", [str(BIN / "steprun"), "dev", "--port", str(port)], env=env, cwd=workdir)
            wait_http(f"http://127.0.0.1:{port}/healthz", proc)
            webs = [(proc, f"http://127.0.0.1:{port}")]
            cwd = workdir
        key = create_key_cli(env, f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}",
                             **({"cwd": cwd} if cwd else {}))
        yield Streams(request.param, [u for _, u in webs], key, env, procs, [p for p, _ in webs])
    finally:
        procs.stop_all()


# --- clients ---------------------------------------------------------------------

def ws_url(url: str, session_id: str, **query: Any) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items() if v is not None)
    return "ws" + url[len("http"):] + f"/v1/sessions/{session_id}/ws" + (f"?{q}" if q else "")


def ws_connect(url: str, session_id: str, key: str | None, **query: Any) -> websocket.WebSocket:
    header = [f"Authorization: Bearer {key}"] if key else []
    sockopt = query.pop("sockopt", ())
    return websocket.create_connection(ws_url(url, session_id, **query), header=header, timeout=20,
                                       sockopt=sockopt)


def ws_frames(ws: websocket.WebSocket, until: Any, timeout: float = 30) -> list[dict[str, Any]]:
    """Frames until ``until(frames so far)`` is true; fails past ``timeout``."""
    deadline = time.monotonic() + timeout
    frames: list[dict[str, Any]] = []
    while True:
        ws.settimeout(max(0.1, deadline - time.monotonic()))
        frames.append(json.loads(ws.recv()))
        if until(frames):
            return frames


def ended(frames: list[dict[str, Any]]) -> bool:
    return frames[-1].get("type") in FINAL


def ws_quiet(ws: websocket.WebSocket, seconds: float) -> list[dict[str, Any]]:
    """Whatever arrives within ``seconds`` (expected: nothing)."""
    ws.settimeout(seconds)
    got = []
    try:
        while True:
            got.append(json.loads(ws.recv()))
    except websocket.WebSocketTimeoutException:
        return got


def drop(ws: websocket.WebSocket) -> None:
    """Cut the connection the way a network does: no close frame."""
    ws.sock.shutdown(socket.SHUT_RDWR)
    ws.sock.close()


def sse_events(response: requests.Response) -> Iterator[dict[str, Any]]:
    """Parsed SSE messages: {"id", "event", "data"} or {"comment"}."""
    message: dict[str, Any] = {}
    for raw in response.iter_lines(chunk_size=None, decode_unicode=True):
        if raw == "":
            if message:
                yield message
            message = {}
        elif raw.startswith(":"):
            yield {"comment": raw[1:].strip()}
        else:
            name, _, value = raw.partition(":")
            message[name] = value[1:] if value.startswith(" ") else value


def sse_until(response: requests.Response, until: Any) -> list[dict[str, Any]]:
    out = []
    for message in sse_events(response):
        if "data" in message:
            event = json.loads(message["data"])
            assert message["id"] == str(event["cursor"]) and message["event"] == event["type"], message
            out.append(event)
            if until(event):
                return out
    raise AssertionError(f"the stream ended early after {len(out)} events")


def deltas(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"]["text"] for e in events if e.get("type") == "message.delta")


def assert_increasing(events: list[dict[str, Any]]) -> None:
    cursors = [e["cursor"] for e in events if "cursor" in e]
    assert all(a < b for a, b in zip(cursors, cursors[1:], strict=False)), cursors


def worker_rss_kb(web: Proc) -> int:
    """RSS of gunicorn's worker (the master's child), or of the process itself (`steprun dev`)."""
    pid = web.popen.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    target = children[0] if children else str(pid)
    for line in Path(f"/proc/{target}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- resume ----------------------------------------------------------------------

def test_ws_resume_after_drop_loses_and_repeats_nothing(streams: Streams) -> None:
    """Drop a WebSocket mid-turn; reconnect (to the other API process, in production) after the last cursor."""
    sid = streams.session("long")
    first = ws_connect(streams.urls[0], sid, streams.key)
    first.send(json.dumps({"type": "turn", "input": "tell me a long story"}))
    part1 = ws_frames(first, lambda fs: len(deltas(fs)) > 80)
    drop(first)
    turn_id = next(f for f in part1 if f.get("type") == "turn.created")["turn"]["id"]
    events1 = [f for f in part1 if "cursor" in f]
    assert not any(e["type"] in FINAL for e in events1), "the turn ended before the drop: not a mid-turn test"

    second = ws_connect(streams.urls[-1], sid, streams.key, after=events1[-1]["cursor"])
    events2 = ws_frames(second, ended, timeout=60)
    second.close()
    assert any(e["type"] == "message.delta" for e in events2)
    events = events1 + events2
    assert_increasing(events)
    done = streams.turn_done(turn_id)
    assert done["status"] == "completed" and len(done["output"].split()) > 400
    assert deltas(events) == done["output"] == events2[-1]["data"]["output"]
    assert {e["turn_id"] for e in events} == {turn_id}


def test_sse_resume_with_last_event_id(streams: Streams) -> None:
    """The same over SSE: a new request with Last-Event-ID continues exactly where the first stopped."""
    sid = streams.session("long")
    h = streams.headers()
    first = requests.get(f"{streams.urls[0]}/v1/sessions/{sid}/events/stream", headers=h, stream=True, timeout=30)
    assert first.status_code == 200 and first.headers["Content-Type"].startswith("text/event-stream")
    turn = requests.post(f"{streams.urls[0]}/v1/sessions/{sid}/turns", json={"input": "a long one"}, headers=h)
    got1: list[dict[str, Any]] = []
    events1 = sse_until(first, lambda e: got1.append(e) or len(deltas(got1)) > 80)
    first.close()
    assert not any(e["type"] in FINAL for e in events1)

    second = requests.get(f"{streams.urls[-1]}/v1/sessions/{sid}/events/stream",
                          headers={**h, "Last-Event-ID": str(events1[-1]["cursor"])}, stream=True, timeout=30)
    events2 = sse_until(second, lambda e: e["type"] in FINAL)
    second.close()
    events = events1 + events2
    assert_increasing(events)
    assert events[0]["type"] == "turn.queued"  # streamed from the moment of connecting: nothing before, nothing lost
    done = streams.turn_done(turn.json()["id"])
    assert deltas(events) == done["output"] and len(done["output"].split()) > 400

    # ?after= resumes too, and an idle stream carries heartbeat comments.
    tail = requests.get(f"{streams.urls[0]}/v1/sessions/{sid}/events/stream?after={events[-3]['cursor']}",
                        headers=h, stream=True, timeout=30)
    messages, started = [], time.monotonic()
    for message in sse_events(tail):
        messages.append(message)
        if time.monotonic() - started > 1.6:
            break
    tail.close()
    assert [json.loads(m["data"])["cursor"] for m in messages if "data" in m] == [e["cursor"] for e in events[-2:]]
    assert sum(1 for m in messages if m.get("comment") == "heartbeat") >= 2


def test_expired_cursor_and_foreign_session(streams: Streams) -> None:
    sid = streams.session("echo")
    h = streams.headers()
    r = requests.get(f"{streams.urls[0]}/v1/sessions/{sid}/events/stream?after=5", headers=h, timeout=10)
    assert r.status_code == 410 and r.json()["error"]["code"] == "cursor_expired"
    assert f"/v1/sessions/{sid}/messages" in r.json()["error"]["message"]
    ws = ws_connect(streams.urls[0], sid, streams.key, after=5)
    error = json.loads(ws.recv())
    assert error["type"] == "error" and error["error"]["code"] == "cursor_expired"
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 4410
    assert json.loads(data[2:]) == {"reason": "cursor_expired", "cursor": 5}

    other = streams.new_key()
    r = requests.get(f"{streams.urls[0]}/v1/sessions/{sid}/events/stream", headers=streams.headers(other))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    with pytest.raises(websocket.WebSocketBadStatusException) as exc:
        ws_connect(streams.urls[0], sid, other)
    assert exc.value.status_code == 404
    for path in ("events/stream", "ws"):
        r = requests.get(f"{streams.urls[0]}/v1/sessions/{sid}/{path}", timeout=10)
        assert r.status_code in (400, 401), (path, r.status_code)
    with pytest.raises(websocket.WebSocketBadStatusException) as exc:
        ws_connect(streams.urls[0], sid, None)
    assert exc.value.status_code == 401


# --- backpressure -----------------------------------------------------------------

# Production only: it needs a web process started with small stream buffers.
@pytest.mark.parametrize("streams", ["production"], indirect=True)
def test_slow_consumer_is_closed_with_its_cursor_and_loses_nothing(streams: Streams) -> None:
    """A client that stops reading is closed with its cursor; it resumes from it; the API's memory stays flat."""
    env = {**streams.env, "STEPRUN_STREAM_BUFFER": "8", "STEPRUN_STREAM_SLOW_SECONDS": "1",
           "STEPRUN_STREAM_SEND_TIMEOUT": "30", "STEPRUN_STREAM_SEND_BUFFER": "8192"}
    web, url = streams.procs.web(env=env)
    sid = streams.session("flood", url=url)
    rss_before = worker_rss_kb(web)
    # A small receive window, so the kernel cannot hide the client's stall in megabytes of buffers.
    ws = ws_connect(url, sid, streams.key, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    ws.send(json.dumps({"type": "turn", "input": "flood me"}))
    # Read nothing until the whole turn has streamed (about 3 s): far more than the socket buffers hold.
    rss_peak = max(stall_until_turn_over(streams, url, sid, 0, lambda: worker_rss_kb(web)))

    frames, close = [], None
    ws.settimeout(30)
    while close is None:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            close = (int.from_bytes(data[:2], "big"), json.loads(data[2:]))
        elif opcode == websocket.ABNF.OPCODE_TEXT:
            frames.append(json.loads(data))
    events1 = [f for f in frames if "cursor" in f]
    turn_id = next(f for f in frames if f.get("type") == "turn.created")["turn"]["id"]
    assert close == (4000, {"reason": "slow_consumer", "cursor": events1[-1]["cursor"]})
    assert not any(e["type"] in FINAL for e in events1)

    again = ws_connect(url, sid, streams.key, after=close[1]["cursor"])
    events2 = ws_frames(again, ended, timeout=60)
    again.close()
    events = events1 + events2
    assert_increasing(events)
    done = streams.turn_done(turn_id)
    assert done["status"] == "completed" and deltas(events) == done["output"]
    # Catching up, it got the deltas merged: fewer, larger frames than the log holds (same text).
    logged = requests.get(f"{url}/v1/sessions/{sid}/events?after={close[1]['cursor']}&limit=1000",
                          headers=streams.headers()).json()["data"]
    count = lambda evs: sum(1 for e in evs if e["type"] == "message.delta")  # noqa: E731
    assert count(events2) < count(logged) and deltas(events2) == deltas(logged)
    # The backlog waited in Redis, not in the API process (the turn streams about 40 KB of text).
    assert rss_peak - rss_before < 20_000, (rss_before, rss_peak)

    # SSE: the same stall ends the stream after a comment naming the cursor; Last-Event-ID picks it up.
    turn_id = requests.post(f"{url}/v1/sessions/{sid}/turns", json={"input": "flood me again"},
                            headers=streams.headers()).json()["id"]
    raw = sse_stalled(url, sid, streams.key, after=events[-1]["cursor"],
                      stall=lambda: stall_until_turn_over(streams, url, sid, events[-1]["cursor"]))
    events1 = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
    assert f": slow_consumer; reconnect with Last-Event-ID: {events1[-1]['cursor']}" in raw
    assert not any(e["type"] in FINAL for e in events1)
    rest = requests.get(f"{url}/v1/sessions/{sid}/events/stream", stream=True, timeout=30,
                        headers={**streams.headers(), "Last-Event-ID": str(events1[-1]["cursor"])})
    events = events1 + sse_until(rest, lambda e: e["type"] in FINAL)
    rest.close()
    assert_increasing(events)
    assert deltas(events) == streams.turn_done(turn_id)["output"]
    web.kill()


def stall_until_turn_over(streams: Streams, url: str, session_id: str, after: int,
                          sample: Any = lambda: 0) -> list[int]:
    """Wait (reading another way: the JSON events route) until a turn ends; ``sample()`` every 0.2 s."""
    samples, deadline = [sample()], time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.2)
        samples.append(sample())
        log = requests.get(f"{url}/v1/sessions/{session_id}/events?after={after}&limit=1000",
                           headers=streams.headers()).json()["data"]
        if any(e["type"] in FINAL for e in log):
            return samples
    raise AssertionError("the turn did not end")


def sse_stalled(url: str, session_id: str, key: str, after: int, stall: Any) -> str:
    """An SSE client with a tiny receive window that reads nothing while ``stall()`` runs, then everything."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /v1/sessions/{session_id}/events/stream?after={after} HTTP/1.1\r\nHost: {host}\r\n"
                 f"Authorization: Bearer {key}\r\n\r\n".encode())
    stall()
    sock.settimeout(30)
    data = b""
    while not data.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of the response
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    # Each SSE chunk holds whole messages, so the chunked framing lines never split an event.
    return data.decode()


# --- fan-out and isolation --------------------------------------------------------

CLIENTS, USERS, PER_SESSION = 300, 50, 2


@pytest.mark.parametrize("streams", ["production"], indirect=True)  # one gunicorn gevent process is the subject here
def test_hundreds_of_clients_each_get_their_own_session_only(streams: Streams, rt: Runtime) -> None:
    """300 WebSockets on one API process, 150 sessions of 50 users, two viewers per session."""
    url, web = streams.urls[0], streams.webs[0]
    keys = []
    for i in range(USERS):
        with unit_of_work(rt.sessions, SYSTEM) as db:  # keys: the system path
            keys.append(create_key(db, f"t-{secrets.token_hex(3)}", f"user{i}")[1])
    sessions = [(keys[i % USERS], streams.session("brief", key=keys[i % USERS]))
                for i in range(CLIENTS // PER_SESSION)]
    rss_before = worker_rss_kb(web)
    connected = threading.Barrier(CLIENTS + 1, timeout=60)
    start_turns = threading.Event()
    results: dict[int, Any] = {}

    def client(n: int) -> None:
        key, sid = sessions[n // PER_SESSION]
        try:
            ws = ws_connect(url, sid, key)
        except Exception as exc:  # noqa: BLE001 - reported below
            results[n] = exc
            connected.abort()
            return
        try:
            connected.wait()
            start_turns.wait(60)
            if n % PER_SESSION == 0:  # one viewer of each session drives it
                ws.send(json.dumps({"type": "turn", "input": f"hello from {sid}"}))
            results[n] = [f for f in ws_frames(ws, ended, timeout=90) if "cursor" in f]
        except Exception as exc:  # noqa: BLE001
            results[n] = exc
        finally:
            ws.close()

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    connected.wait()
    connect_seconds = time.monotonic() - started
    rss_connected = worker_rss_kb(web)
    start_turns.set()
    for t in threads:
        t.join(120)
    total_seconds = time.monotonic() - started

    failures = {n: r for n, r in results.items() if isinstance(r, Exception)}
    assert not failures and len(results) == CLIENTS, (len(results), list(failures.items())[:3])
    for n, events in results.items():
        _, sid = sessions[n // PER_SESSION]
        turn_ids = {e["turn_id"] for e in events}
        assert len(turn_ids) == 1, (sid, turn_ids)
        assert events[-1]["type"] == "turn.completed"
        text = deltas(events)
        assert text.startswith(f"You said: hello from {sid} ") and text == events[-1]["data"]["output"]
        assert_increasing(events)
        # Both viewers of a session saw the same events, and only their own session's.
        twin = results[n ^ 1] if PER_SESSION == 2 else events
        assert deltas(twin) == text and twin[-1]["cursor"] == events[-1]["cursor"]
    per_connection_kb = (rss_connected - rss_before) / CLIENTS
    print(f"\n{CLIENTS} websockets: connected in {connect_seconds:.1f}s, all turns streamed in "
          f"{total_seconds:.1f}s, ~{per_connection_kb:.0f} KB RSS per connection")
    assert per_connection_kb < 400, per_connection_kb


# --- auth ---------------------------------------------------------------------------

def test_stream_token_opens_its_own_session_only(streams: Streams) -> None:
    url = streams.urls[0]
    who = Principal(f"t-{secrets.token_hex(3)}", "browser-user")
    key = streams.new_key(who.tenant_id, who.user_id)
    # Production: the operator's STEPRUN_SECRET_KEY. `steprun dev`: the one it made and kept in its data dir.
    secret = streams.env["STEPRUN_SECRET_KEY"] if streams.mode == "production" else (
        Path(streams.env["STEPRUN_DATA_DIR"]) / "secret-key").read_text().strip()
    sid, other_sid = streams.session("echo", key=key), streams.session("echo", key=key)
    # A write token: this browser also starts turns over the socket (a read token only streams).
    minted = requests.post(f"{url}/v1/sessions/{sid}/stream-token", headers=streams.headers(key),
                           json={"scope": "write"})
    assert minted.status_code == 200, minted.text
    token = minted.json()["token"]
    assert minted.json()["expires_in"] == 300 and minted.json()["expires_at"].endswith("Z")

    # Accepted for its session, by either API process, on SSE and on the WebSocket.
    r = requests.get(f"{streams.urls[-1]}/v1/sessions/{sid}/events/stream?token={token}", stream=True, timeout=10)
    assert r.status_code == 200 and next(r.iter_lines()) == b"retry: 1000"
    r.close()
    ws = ws_connect(url, sid, None, token=token)
    ws.send(json.dumps({"type": "turn", "input": "via a token"}))
    events = [f for f in ws_frames(ws, ended) if "cursor" in f]
    ws.close()
    assert deltas(events).startswith("You said: via a token")

    expired, _ = mint_stream_token(secret, who, sid, ttl=-1)
    forged, _ = mint_stream_token("not-the-secret", who, sid, ttl=300)
    payload, _, signature = token.partition(".")
    tampered = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1] + "." + signature
    for bad, session in [(token, other_sid), (expired, sid), (forged, sid), (tampered, sid), ("junk", sid)]:
        r = requests.get(f"{url}/v1/sessions/{session}/events/stream?token={bad}", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (bad, r.text)
        with pytest.raises(websocket.WebSocketBadStatusException) as exc:
            ws_connect(url, session, None, token=bad)
        assert exc.value.status_code == 401
    # A stream token is no API key: other routes ignore it, and it cannot mint more tokens.
    assert requests.get(f"{url}/v1/sessions/{sid}?token={token}").status_code == 401
    assert requests.post(f"{url}/v1/sessions/{sid}/stream-token?token={token}").status_code == 401
    # Another user's session: 404, no token.
    r = requests.post(f"{url}/v1/sessions/{sid}/stream-token", headers=streams.headers())
    assert r.status_code == 404

    if streams.mode != "production":
        return
    # A production web process without STEPRUN_SECRET_KEY refuses to start, saying so (not a 503 at the
    # first stream token).
    env = {k: v for k, v in streams.env.items() if k != "STEPRUN_SECRET_KEY"}
    with pytest.raises(RuntimeError, match="STEPRUN_SECRET_KEY is not set"):
        streams.procs.web(env=env)


# --- the WebSocket protocol ---------------------------------------------------------

def test_bad_frames_get_errors_and_the_socket_keeps_working(streams: Streams) -> None:
    sid = streams.session("echo")
    ws = ws_connect(streams.urls[0], sid, streams.key)
    bad = [
        ("not json", "invalid_request", None),
        ("[1, 2]", "invalid_request", None),
        (json.dumps({"type": "dance"}), "invalid_request", "type"),
        (json.dumps({"type": "turn"}), "invalid_request", "input"),
        (json.dumps({"type": "turn", "input": "x", "on_busy": "sometimes"}), "invalid_request", "on_busy"),
        (json.dumps({"type": "cancel", "turn_id": 7}), "invalid_request", "turn_id"),
        (json.dumps({"type": "cancel", "turn_id": "turn_nope"}), "not_found", None),
        (json.dumps({"type": "resume", "turn_id": "turn_nope", "approve": True}), "not_found", None),
        (json.dumps({"type": "subscribe", "after": "soon"}), "invalid_request", "after"),
        (json.dumps({"type": "turn", "input": "x" * 1_100_000}), "too_large", None),
    ]
    for frame, code, field_ in bad:
        ws.send(frame)
        reply = ws_frames(ws, lambda fs: True, timeout=10)[0]
        assert reply["type"] == "error" and reply["error"]["code"] == code, (frame[:80], reply)
        assert reply["error"].get("field") == field_, (frame[:80], reply)
    ws.send_binary(b"\x00\x01")
    assert json.loads(ws.recv())["error"]["code"] == "invalid_request"
    ws.send(json.dumps({"type": "ping", "ref": "p1"}))
    assert json.loads(ws.recv()) == {"type": "pong", "ref": "p1"}

    # Still fully usable: a turn, then a cancel of the finished turn (idempotent).
    ws.send(json.dumps({"type": "turn", "input": "still here?"}))
    frames = ws_frames(ws, ended)
    turn = next(f for f in frames if f.get("type") == "turn.created")["turn"]
    assert deltas(frames).startswith("You said: still here?")
    ws.send(json.dumps({"type": "cancel", "turn_id": turn["id"]}))
    reply = json.loads(ws.recv())
    assert reply["type"] == "cancel.ok" and reply["turn"]["status"] == "completed"
    ws.close()


def test_subscribe_repositions_without_sending_anything_twice(streams: Streams) -> None:
    sid = streams.session("echo")
    h = streams.headers()
    turn = requests.post(f"{streams.urls[0]}/v1/sessions/{sid}/turns", json={"input": "first"}, headers=h).json()
    streams.turn_done(turn["id"])
    log = requests.get(f"{streams.urls[0]}/v1/sessions/{sid}/events", headers=h).json()["data"]
    cursors = [e["cursor"] for e in log]

    ws = ws_connect(streams.urls[0], sid, streams.key)  # from now: nothing of the first turn
    assert ws_quiet(ws, 0.3) == []
    ws.send(json.dumps({"type": "subscribe", "after": cursors[-4]}))
    got = ws_frames(ws, lambda fs: fs[-1].get("type") == "subscribe.ok")
    assert [f["cursor"] for f in got if "cursor" in f] == cursors[-3:]
    ws.send(json.dumps({"type": "subscribe", "after": cursors[-6]}))
    got = ws_frames(ws, lambda fs: fs[-1].get("type") == "subscribe.ok")
    assert [f["cursor"] for f in got if "cursor" in f] == cursors[-5:-3]
    ws.send(json.dumps({"type": "subscribe", "after": cursors[-5]}))  # all sent already
    got = ws_frames(ws, lambda fs: fs[-1].get("type") == "subscribe.ok")
    assert [f for f in got if "cursor" in f] == [] and ws_quiet(ws, 0.3) == []

    ws.send(json.dumps({"type": "turn", "input": "second"}))
    frames = [f for f in ws_frames(ws, ended) if "cursor" in f]
    assert frames[0]["cursor"] == cursors[-1] + 1 and deltas(frames).startswith("You said: second")

    # Going back over events already sent sends nothing. (A cursor the log never issued reads as gone
    # since fenced, restore-safe cursors: subscribing ahead of the log is no longer a way to skip.)
    last = frames[-1]["cursor"]
    ws.send(json.dumps({"type": "subscribe", "after": last - 2}))
    got = ws_frames(ws, lambda fs: fs[-1].get("type") == "subscribe.ok")
    assert [f for f in got if "cursor" in f] == [] and ws_quiet(ws, 0.3) == []
    ws.close()


# --- steprun chat -------------------------------------------------------------------

def start_chat(streams: Streams, url: str, agent: str) -> subprocess.Popen:
    """`steprun chat` as a user runs it, configured by the client-side variables."""
    env = {**streams.env, "STEPRUN_URL": url, "STEPRUN_KEY": streams.key}
    return subprocess.Popen([str(BIN / "steprun"), "chat", "--agent", agent], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_chat_streams_answers_and_asks_before_acting(streams: Streams) -> None:
    proc = start_chat(streams, streams.urls[0], "bank")
    out, err = proc.communicate("hello bank\ntransfer 5 to bob\ny\nadd 2 and 3\n", timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["You said: hello bank", "The result of transfer is sent 5.00 to 5 to bob.",
                                "The result of add is 5."], (out, err)
    assert "approve transfer(" in err and "session ses_" in err
    if streams.mode == "embedded":
        # `steprun dev` tells how to start this very client (a full path: `steprun` need not be on PATH).
        assert f"steprun chat --url {streams.urls[0]} " in streams.webs[0].log()
        assert "--agent math" in streams.webs[0].log()


class CuttableProxy:
    """A loopback TCP proxy: the test can cut every connection (a network drop) and switch the backend."""

    def __init__(self, backend: str):
        self.backend = backend
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            host, port = self.backend.rsplit("/", 1)[-1].split(":")
            upstream = socket.create_connection((host, int(port)))
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self, new_backend: str) -> None:
        self.backend = new_backend
        for s in self.open:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.open = []

    def close(self) -> None:
        self.cut(self.backend)
        self.listener.close()


@pytest.mark.parametrize("streams", ["production"], indirect=True)  # needs two API processes
def test_chat_reconnects_to_another_api_mid_answer_without_repeating(streams: Streams) -> None:
    proxy = CuttableProxy(streams.urls[0])
    proc = start_chat(streams, proxy.url, "long")
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("a long answer please\n")
    proc.stdin.close()
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while len(printed) < 100 and time.monotonic() < deadline:
        time.sleep(0.02)
    proxy.cut(streams.urls[1])  # the network drops; the next connection reaches the other API process
    proc.wait(60)
    reader.join(5)
    proxy.close()
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, err
    assert "[connection lost" in err
    sid = err.split("session ", 1)[1].split()[0]
    messages = requests.get(f"{streams.urls[0]}/v1/sessions/{sid}/messages", headers=streams.headers()).json()
    answer = messages["data"][-1]["content"]
    assert len(answer.split()) > 400
    assert "".join(printed) == answer + "\n"


@pytest.mark.parametrize("streams", ["production"], indirect=True)
def test_a_lagging_websocket_is_always_told_4000_with_its_cursor(streams: Streams) -> None:
    """A client that reads nothing while a long turn streams: its writes would block (small buffers,
    a short send timeout), yet it is closed with the close frame, never dropped mid-frame."""
    env = {**streams.env, "STEPRUN_STREAM_SLOW_SECONDS": "2", "STEPRUN_STREAM_SEND_TIMEOUT": "1",
           "STEPRUN_STREAM_SEND_BUFFER": "8192"}
    _, url = streams.procs.web(env=env)
    sid = streams.session("flood", url=url)
    ws = ws_connect(url, sid, streams.key, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    ws.send(json.dumps({"type": "turn", "input": "flood me"}))
    stall_until_turn_over(streams, url, sid, 0)
    time.sleep(3)  # well past the send timeout and the slow-consumer limit
    frames, close = [], None
    ws.settimeout(30)
    while close is None:
        opcode, data = ws.recv_data(control_frame=True)  # an abrupt drop raises here
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            close = (int.from_bytes(data[:2], "big"), json.loads(data[2:]))
        elif opcode == websocket.ABNF.OPCODE_TEXT:
            frames.append(json.loads(data))
    events = [f for f in frames if "cursor" in f]
    assert close == (4000, {"reason": "slow_consumer", "cursor": events[-1]["cursor"]})
    turn_id = next(f for f in frames if f.get("type") == "turn.created")["turn"]["id"]
    again = ws_connect(url, sid, streams.key, after=close[1]["cursor"])
    rest = ws_frames(again, ended, timeout=60)
    again.close()
    assert_increasing(events + rest)
    assert deltas(events + rest) == streams.turn_done(turn_id)["output"]
