"""Red-team regressions of the transport layer, against the real Procfile processes (gunicorn web, Celery worker).

One user, or nobody at all, must not be able to starve everyone else:

- streams: one user opening hundreds of WebSockets/SSE streams/long-polls (a cap per user and per tenant,
  counted across web processes, freed when a process dies);
- slowloris: a request head sent a line at a time, a body a few bytes at a time (deadlines on both);
- WebSocket frames: compressed frames inflating a thousandfold, and floods of pings or malformed frames;
- metrics: tool names the model makes up becoming Prometheus series.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import select
import signal
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import websocket
from prometheus_client.parser import text_string_to_metric_families

from shared.auth.keys import create_key
from shared.auth.principal import SYSTEM
from shared.db import unit_of_work
from shared.runtime import Runtime
from shared.settings import Settings
from tests.support.processes import Procs, free_port, settings_env

PER_USER, PER_TENANT = 3, 5
SLOT_SECONDS = 3.0
HEADER_TIMEOUT = BODY_TIMEOUT = 2.0
FRAMES_PER_SECOND = 10


@dataclass
class Deployment:
    url: str
    env: dict[str, str]
    procs: Procs
    rt: Runtime
    worker_metrics: str
    open: list[Any] = field(default_factory=list)

    def key(self, tenant: str | None = None, user: bool = True) -> str:
        """The raw key of a fresh user (or, with user=False, a service key) of ``tenant`` (default: a fresh one)."""
        with unit_of_work(self.rt.sessions, SYSTEM) as db:
            _, raw = create_key(db, tenant or f"t-{secrets.token_hex(4)}",
                                f"u-{secrets.token_hex(4)}" if user else None)
            return raw


@pytest.fixture(scope="module")
def deployment(settings: Settings, rt: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    procs = Procs(settings, tmp_path_factory.mktemp("transport"))
    env = settings_env(settings)
    env.update(STEPRUN_AGENTS="tests.support.agents_security", STEPRUN_RATE_LIMIT_PER_MINUTE="0",
               STEPRUN_MAX_STREAMS_PER_USER=str(PER_USER), STEPRUN_MAX_STREAMS_PER_TENANT=str(PER_TENANT),
               STEPRUN_STREAM_SLOT_SECONDS=str(SLOT_SECONDS), STEPRUN_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
               STEPRUN_BODY_TIMEOUT=str(BODY_TIMEOUT), STEPRUN_WS_FRAMES_PER_SECOND=str(FRAMES_PER_SECOND),
               STEPRUN_SSE_HEARTBEAT_SECONDS="0.5",
               # Up to four processes at once here; Postgres' 100 connections are shared with other suites.
               STEPRUN_DB_POOL_SIZE="3", STEPRUN_DB_MAX_OVERFLOW="3")
    metrics_port = free_port()
    try:
        procs.worker(env={**env, "STEPRUN_WORKER_METRICS_PORT": str(metrics_port),
                          "STEPRUN_METRICS_ADDR": "127.0.0.1"})
        _, url = procs.web(env=env)
        yield Deployment(url, env, procs, rt, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        procs.stop_all()


@pytest.fixture
def d(deployment: Deployment) -> Iterator[Deployment]:
    """The deployment; every stream a test opens through it is closed after the test."""
    yield deployment
    for stream in deployment.open:
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - already closed by the server
            pass
    deployment.open.clear()


def _h(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def _session(url: str, key: str, agent: str = "echo", **headers: str) -> str:
    r = requests.post(f"{url}/v1/sessions", json={"agent": agent}, headers=_h(key, **headers), timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _ws(d: Deployment, url: str, sid: str, key: str) -> websocket.WebSocket:
    ws = websocket.create_connection("ws" + url[len("http"):] + f"/v1/sessions/{sid}/ws",
                                     header=[f"Authorization: Bearer {key}"], timeout=10)
    d.open.append(ws)
    return ws


def _serving(ws: websocket.WebSocket) -> None:
    ws.send(json.dumps({"type": "ping", "ref": "p"}))
    assert json.loads(ws.recv()) == {"type": "pong", "ref": "p"}


def _sse(d: Deployment, url: str, sid: str, key: str, **headers: str) -> requests.Response:
    r = requests.get(f"{url}/v1/sessions/{sid}/events/stream", headers=_h(key, **headers), stream=True, timeout=10)
    d.open.append(r)
    return r


def _refused_ws(ws: websocket.WebSocket, scope: str) -> None:
    """The socket was turned away: an error frame, then close 4429 with the reason and when to retry."""
    error = json.loads(ws.recv())
    assert error["type"] == "error" and error["error"]["code"] == "too_many_streams", error
    assert scope in error["error"]["message"] and error["error"]["retry_after"] > 0
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(data[:2], "big") == 4429
    reason = json.loads(data[2:])
    assert reason["reason"] == "too_many_streams" and reason["retry_after"] > 0, reason


def _refused_http(r: requests.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "too_many_streams", r.text
    assert int(r.headers["Retry-After"]) >= 1


def _streams(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {s.labels["transport"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "steprun_active_streams" for s in f.samples}


def _eventually(check: Any, timeout: float, what: str) -> float:
    """Seconds until ``check()`` is true; fails after ``timeout``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - start


# --- streams: a cap per user and per tenant, across processes --------------------------------------------


def test_one_user_cannot_hold_more_than_its_streams_and_others_still_can(d: Deployment) -> None:
    key, other = d.key(), d.key()
    sid = _session(d.url, key)
    held = [_ws(d, d.url, sid, key), _ws(d, d.url, sid, key)]
    for ws in held:
        _serving(ws)
    sse = _sse(d, d.url, sid, key)
    assert sse.status_code == 200, sse.text
    _eventually(lambda: _streams(d.url).get("ws") == 2 and _streams(d.url).get("sse") == 1, 10, "gauge")

    # The fourth stream of any kind is refused: WebSocket (4429), SSE and a long-poll (429 with Retry-After).
    _refused_ws(_ws(d, d.url, sid, key), "user")
    _refused_http(_sse(d, d.url, sid, key))
    _refused_http(requests.get(f"{d.url}/v1/sessions/{sid}/events?wait=5", headers=_h(key), timeout=10))
    # A plain request (no wait) is no stream, and another user streams as before.
    assert requests.get(f"{d.url}/v1/sessions/{sid}/events", headers=_h(key), timeout=10).status_code == 200
    other_sid = _session(d.url, other)
    _serving(_ws(d, d.url, other_sid, other))

    # A second web process counts the same slots (Redis): still refused there.
    _, url2 = d.procs.web(env=d.env)
    _refused_ws(_ws(d, url2, sid, key), "user")

    # Closing one gives its slot back at once.
    held[0].close()
    _eventually(lambda: _streams(d.url).get("ws") == 2, 10, "the closed socket uncounted")
    _serving(_ws(d, url2, sid, key))


def test_a_long_poll_holds_a_slot_while_it_waits(d: Deployment) -> None:
    key = d.key()
    sid = _session(d.url, key)
    for _ in range(PER_USER - 1):
        _serving(_ws(d, d.url, sid, key))
    import threading

    polled: dict[str, Any] = {}
    poll = threading.Thread(target=lambda: polled.setdefault("r", requests.get(
        f"{d.url}/v1/sessions/{sid}/events?wait=3", headers=_h(key), timeout=10)))
    poll.start()
    _eventually(lambda: _streams(d.url).get("poll", 0) >= 1, 5, "the waiting poll counted")
    _refused_ws(_ws(d, d.url, sid, key), "user")  # the poll holds the third slot
    poll.join(10)
    assert polled["r"].status_code == 200
    _serving(_ws(d, d.url, sid, key))  # and gave it back when it answered


def test_a_tenant_cannot_hold_more_than_its_streams_across_users(d: Deployment) -> None:
    tenant = f"t-{secrets.token_hex(4)}"
    service = d.key(tenant, user=False)
    sids = {}
    for i in range(3):
        sids[i] = _session(d.url, service, **{"X-User-Id": f"user-{i}"})
    opened = 0
    for i in range(3):
        for _ in range(2):
            if opened == PER_TENANT:
                break
            r = _sse(d, d.url, sids[i], service, **{"X-User-Id": f"user-{i}"})
            assert r.status_code == 200, r.text
            opened += 1
    # user-2 holds one stream (under its own cap of 3), but the tenant holds 5: refused, naming the tenant.
    r = _sse(d, d.url, sids[2], service, **{"X-User-Id": "user-2"})
    _refused_http(r)
    assert "tenant" in r.json()["error"]["message"]


def test_the_compatible_surfaces_take_a_slot_before_they_create_anything(d: Deployment) -> None:
    key = d.key()
    sid = _session(d.url, key)
    for _ in range(PER_USER):
        _serving(_ws(d, d.url, sid, key))
    before = requests.get(f"{d.url}/v1/sessions", headers=_h(key), timeout=10).json()["data"]
    run = {"assistant_id": "echo", "input": {"messages": [{"role": "user", "content": "hi"}]}}
    for path, body in [
        ("/langgraph/runs/stream", run),
        ("/langgraph/runs/wait", run),
        ("/v1/responses", {"model": "echo", "input": "hi", "stream": True}),
        ("/v1/responses", {"model": "echo", "input": "hi"}),
    ]:
        r = requests.post(d.url + path, json=body, headers=_h(key), timeout=10)
        assert r.status_code == 429, (path, r.status_code, r.text[:300])
        # Each surface in its own error shape (LangGraph: {"detail"}, OpenAI: {"error"}), with Retry-After.
        assert "open streams" in r.text and int(r.headers["Retry-After"]) >= 1, (path, r.text)
    after = requests.get(f"{d.url}/v1/sessions", headers=_h(key), timeout=10).json()["data"]
    assert after == before  # no thread, run, conversation or response was created
    # In the background, an OpenAI response waits for nothing: no slot needed.
    r = requests.post(f"{d.url}/v1/responses", json={"model": "echo", "input": "hi", "background": True},
                      headers=_h(key), timeout=10)
    assert r.status_code == 200, r.text


def test_a_killed_web_process_does_not_keep_its_slots(d: Deployment) -> None:
    key = d.key()
    sid = _session(d.url, key)
    doomed, url2 = d.procs.web(env=d.env)
    for _ in range(PER_USER):
        _serving(_ws(d, url2, sid, key))
    _refused_ws(_ws(d, d.url, sid, key), "user")
    os.killpg(doomed.popen.pid, signal.SIGKILL)  # no close, no release: only the leases end them
    doomed.popen.wait(10)
    killed = time.monotonic()

    def accepted() -> bool:
        ws = _ws(d, d.url, sid, key)
        ws.send(json.dumps({"type": "ping"}))
        return json.loads(ws.recv()).get("type") == "pong"

    _eventually(accepted, SLOT_SECONDS + 5, "the dead process's slots freed")
    print(f"\nslots of a SIGKILLed web process freed after {time.monotonic() - killed:.1f} s "
          f"(STEPRUN_STREAM_SLOT_SECONDS={SLOT_SECONDS})")


# --- slowloris: deadlines on a request's head and body ------------------------------------------------


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (EOF or reset); drains anything it sent first."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def test_a_request_head_sent_a_line_at_a_time_is_cut_at_the_header_timeout(d: Deployment) -> None:
    sock = _connect(d.url)
    started = time.monotonic()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    closed_after = None
    while time.monotonic() - started < HEADER_TIMEOUT + 6:
        time.sleep(0.5)
        if _closed_by_server(sock):
            closed_after = time.monotonic() - started
            break
        try:
            sock.sendall(b"X-Slow: 1\r\n")  # one more header line, never the blank line that ends them
        except OSError:
            closed_after = time.monotonic() - started
            break
    sock.close()
    assert closed_after is not None, "the server kept a trickling request head open"
    assert HEADER_TIMEOUT - 0.5 <= closed_after <= HEADER_TIMEOUT + 2, closed_after
    print(f"\na head trickled a line every 0.5 s was cut after {closed_after:.1f} s "
          f"(STEPRUN_HEADER_TIMEOUT={HEADER_TIMEOUT})")


def _response(sock: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body), however the bytes arrive."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, data
        body += chunk
    return head


def test_an_idle_keep_alive_connection_outlives_the_header_timeout(d: Deployment) -> None:
    sock = _connect(d.url)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    sock.sendall(request)
    assert _response(sock).startswith(b"HTTP/1.1 200")
    time.sleep(HEADER_TIMEOUT + 1.5)  # idle, between requests: only keepalive (95 s) bounds this wait
    sock.sendall(request)
    assert _response(sock).startswith(b"HTTP/1.1 200")
    sock.close()


def _slow_post(url: str, path: str, headers: str, length: int, seconds: float) -> tuple[bytes, float | None]:
    """POST ``length`` bytes a few at a time for up to ``seconds``: (what the server answered, when it closed)."""
    sock = _connect(url)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
                 f"Content-Length: {length}\r\n\r\n".encode())
    started = time.monotonic()
    answer = b""
    sock.settimeout(0.3)
    closed = None
    while time.monotonic() - started < seconds:
        try:
            data = sock.recv(65536)
            if not data:
                closed = time.monotonic() - started
                break
            answer += data
            continue
        except TimeoutError:
            pass
        except OSError:
            closed = time.monotonic() - started
            break
        try:
            sock.sendall(b" " * 4)
        except OSError:
            closed = time.monotonic() - started
            break
    sock.close()
    return answer, closed


def test_a_slow_authenticated_body_gets_a_408_and_the_connection_is_closed(d: Deployment) -> None:
    key = d.key()
    answer, closed = _slow_post(d.url, "/v1/sessions", f"Authorization: Bearer {key}\r\n", 100_000,
                                BODY_TIMEOUT + 6)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout" and "STEPRUN_BODY_TIMEOUT" in body["error"]["message"]
    assert closed is not None and closed <= BODY_TIMEOUT + 2, closed
    listed = requests.get(f"{d.url}/v1/sessions", headers=_h(key), timeout=10).json()["data"]
    assert listed == []  # nothing written
    print(f"\na body trickled 4 bytes at a time got 408 and was closed after {closed:.1f} s "
          f"(STEPRUN_BODY_TIMEOUT={BODY_TIMEOUT})")


def test_a_slow_body_the_app_never_reads_is_not_drained_forever(d: Deployment) -> None:
    answer, closed = _slow_post(d.url, "/v1/sessions", "", 100_000, BODY_TIMEOUT + 6)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]  # answered at once: no key
    assert closed is not None and closed <= BODY_TIMEOUT + 2, closed  # then closed, not drained a byte at a time


# --- WebSocket frames: no inflation, every frame counted -------------------------------------------------


def _raw_ws(url: str, sid: str, key: str, extensions: str | None) -> tuple[socket.socket, bytes]:
    sock = _connect(url)
    head = (f"GET /v1/sessions/{sid}/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(secrets.token_bytes(16)).decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n")
    if extensions:
        head += f"Sec-WebSocket-Extensions: {extensions}\r\n"
    sock.sendall((head + "\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(4096)
    return sock, response.split(b"\r\n\r\n", 1)[0]


def _frame(payload: bytes, opcode: int = 1, rsv1: bool = False) -> bytes:
    mask = secrets.token_bytes(4)
    head = bytes([0x80 | (0x40 if rsv1 else 0) | opcode])
    n = len(payload)
    head += bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack("!H", n) if n < 65536
                                              else bytes([0x80 | 127]) + struct.pack("!Q", n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    b0, b1 = exactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", exactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", exactly(8))[0]
    return b0 & 0x0F, exactly(n)


def test_permessage_deflate_is_not_negotiated_and_a_compressed_frame_is_refused(d: Deployment) -> None:
    key = d.key()
    sid = _session(d.url, key)
    sock, head = _raw_ws(d.url, sid, key, "permessage-deflate; client_max_window_bits")
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"permessage-deflate" not in head.lower(), head
    # A 1 MB JSON ping deflates to about 1 KB; sent compressed anyway (RSV1), it is a protocol error.
    ping = b'{"type":"ping","pad":"' + b" " * 1_000_000 + b'"}'
    compressor = zlib.compressobj(wbits=-15)
    packed = compressor.compress(ping) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert len(packed) < 2000
    sock.sendall(_frame(packed[:-4], rsv1=True))
    sock.settimeout(5)
    frames = []
    try:
        while True:
            frames.append(_read_frame(sock))
            if frames[-1][0] == 8:
                break
    except (ConnectionError, OSError):
        pass
    sock.close()
    assert all(b"pong" not in payload for _, payload in frames), frames
    closes = [payload for opcode, payload in frames if opcode == 8]
    assert not closes or int.from_bytes(closes[0][:2], "big") == 1002, closes


def test_every_frame_counts_against_the_frame_rate_and_a_flood_is_closed(d: Deployment) -> None:
    key = d.key()
    sid = _session(d.url, key)
    ws = _ws(d, d.url, sid, key)
    # Pings, malformed, binary and oversized frames: none of them is free.
    flood: list[str | bytes] = ["x" * 1_100_000, "{not json", b"\x00\x01", json.dumps({"type": "ping"})]
    flood += [json.dumps({"type": "ping"}), "{not json", b"\x00\x01"] * 100
    answers, data = 0, None

    def read_one() -> None:
        nonlocal answers, data
        got = ws.recv_frame()  # the frames as they come (no automatic close reply to a closed socket)
        if got.opcode == websocket.ABNF.OPCODE_CLOSE:
            data = got.data
        else:
            answers += 1

    opened = time.monotonic()
    for frame in flood:
        try:
            ws.send_binary(frame) if isinstance(frame, bytes) else ws.send(frame)
        except (BrokenPipeError, ConnectionResetError, websocket.WebSocketConnectionClosedException):
            break  # the server closed while the flood was still going out: its close frame is queued here
        while data is None and select.select([ws.sock], [], [], 0)[0]:
            read_one()
        if data is not None:
            break
    while data is None:
        read_one()
    elapsed = time.monotonic() - opened
    assert int.from_bytes(data[:2], "big") == 1008, data
    assert json.loads(data[2:])["reason"] == "frame_rate"
    # The burst, plus what the budget refilled while the flood went out (on a loaded machine that
    # takes a while) - never the whole flood.
    assert answers <= 2 * FRAMES_PER_SECOND + FRAMES_PER_SECOND * elapsed + 5, (answers, elapsed)
    assert answers < len(flood) // 2, answers
    print(f"\na flood of {len(flood)} frames was answered {answers} times, then closed 1008 "
          f"(STEPRUN_WS_FRAMES_PER_SECOND={FRAMES_PER_SECOND})")
    # Another socket of the same user is unaffected.
    _serving(_ws(d, d.url, sid, key))


# --- metrics: the model does not get to name series ----------------------------------------------------


def _tool_labels(metrics_url: str) -> set[str]:
    text = requests.get(metrics_url, timeout=10).text
    return {s.labels["tool"] for f in text_string_to_metric_families(text)
            if f.name == "steprun_tool_call_duration_seconds" for s in f.samples if "tool" in s.labels}


def test_tool_names_the_model_invents_do_not_become_metric_series(d: Deployment) -> None:
    key = d.key()
    sid = _session(d.url, key, agent="inventor")
    r = requests.post(f"{d.url}/v1/sessions/{sid}/turns", json={"input": "invent 30"}, headers=_h(key), timeout=10)
    assert r.status_code == 202, r.text
    turn = requests.get(f"{d.url}/v1/turns/{r.json()['id']}?wait=30", headers=_h(key), timeout=40).json()
    assert turn["status"] == "completed", turn
    trace = requests.get(f"{d.url}/v1/turns/{turn['id']}/trace", headers=_h(key), timeout=10).json()
    assert sum(1 for s in trace["spans"] if s["kind"] == "tool") == 31, trace  # the trace keeps every name

    labels = _tool_labels(d.worker_metrics)
    assert labels >= {"add", "unregistered"}, labels
    assert not [name for name in labels if name.startswith("made_up_")], labels
    print(f"\n31 tool calls, 30 of them to invented names: tool label values {sorted(labels)}")
