"""``steprun_active_streams`` on a real web process counts each open SSE stream and WebSocket, per transport.

gunicorn with gevent workers, as the Procfile runs it (one worker, so /metrics
is that process's registry). A stream counts from when it starts until it
ends, however it ends: the client closing it, the client vanishing without a
word, or the server closing it.
"""
from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests
import websocket
from prometheus_client.parser import text_string_to_metric_families

from shared.settings import Settings
from tests.support.processes import Procs, create_key_cli, settings_env

pytestmark = pytest.mark.e2e

GAUGE = "steprun_active_streams"


class SSE:
    """An open SSE response and its one line reader.

    The reader must live as long as the stream: urllib3 closes the connection
    when a reader of an unfinished body is dropped.
    """

    def __init__(self, response: requests.Response):
        self.response = response
        self.lines = response.iter_lines(decode_unicode=True)

    def close(self) -> None:
        self.response.close()


class Web:
    """One gunicorn web process and a fresh user's key on it."""

    def __init__(self, procs: Procs, settings: Settings):
        # A short heartbeat: an SSE stream finds out its client is gone at its next write.
        env = {**settings_env(settings), "STEPRUN_SSE_HEARTBEAT_SECONDS": "0.2",
               "STEPRUN_RATE_LIMIT_PER_MINUTE": "0", "STEPRUN_RATE_LIMIT_PER_KEY": "0"}
        _, self.url = procs.web(env=env)
        self.key = create_key_cli(env, f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}")
        self.headers = {"Authorization": f"Bearer {self.key}"}

    def session(self) -> str:
        r = requests.post(f"{self.url}/v1/sessions", json={"agent": "math"}, headers=self.headers, timeout=10)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def open_sse(self, session_id: str) -> SSE:
        r = requests.get(f"{self.url}/v1/sessions/{session_id}/events/stream", headers=self.headers,
                         stream=True, timeout=10)
        assert r.status_code == 200, r.text
        stream = SSE(r)
        assert next(stream.lines) == "retry: 1000"  # the body runs: the stream is open
        return stream

    def open_ws(self, session_id: str) -> websocket.WebSocket:
        url = "ws" + self.url[len("http"):] + f"/v1/sessions/{session_id}/ws"
        ws = websocket.create_connection(url, header=[f"Authorization: Bearer {self.key}"], timeout=10)
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv()) == {"type": "pong"}  # the server side is serving it
        return ws

    def streams(self) -> dict[str, float]:
        """The gauge's value per transport, as /metrics shows it."""
        r = requests.get(f"{self.url}/metrics", timeout=10)
        assert r.status_code == 200, r.text
        return {sample.labels["transport"]: sample.value
                for family in text_string_to_metric_families(r.text) if family.name == GAUGE
                for sample in family.samples}

    def wait_streams(self, sse: float, ws: float, timeout: float = 15) -> None:
        """Until the gauge reads ``sse`` and ``ws``; fails with what it read last."""
        expected = {"sse": sse, "ws": ws, "poll": 0}
        deadline = time.monotonic() + timeout
        while (seen := self.streams()) != expected:
            assert time.monotonic() < deadline, f"{GAUGE}: {seen}, expected {expected}"
            time.sleep(0.1)


@pytest.fixture
def web(procs: Procs, settings: Settings) -> Web:
    return Web(procs, settings)


@contextmanager
def closing_all(sse: list[SSE], ws: list[websocket.WebSocket]) -> Iterator[None]:
    try:
        yield
    finally:
        for r in sse:
            r.close()
        for w in ws:
            w.close()


def test_open_streams_are_counted_per_transport_and_uncounted_when_closed(web: Web) -> None:
    sid = web.session()
    assert web.streams() == {"sse": 0, "ws": 0, "poll": 0}  # every series exists before any stream
    sse = [web.open_sse(sid), web.open_sse(sid)]
    ws = [web.open_ws(sid)]
    with closing_all(sse, ws):
        web.wait_streams(sse=2, ws=1)

        ws[0].close()  # a close frame
        web.wait_streams(sse=2, ws=0)
        sse[0].close()  # the client hangs up: the stream's next heartbeat fails and ends it
        web.wait_streams(sse=1, ws=0)
        sse[1].close()
        web.wait_streams(sse=0, ws=0)


def test_a_stream_is_uncounted_however_it_ends(web: Web) -> None:
    sid, other = web.session(), web.session()
    sse = web.open_sse(sid)
    vanishing, closed_by_server = web.open_ws(sid), web.open_ws(other)
    with closing_all([sse], [vanishing, closed_by_server]):
        web.wait_streams(sse=1, ws=2)

        # The network drops a WebSocket: no close frame.
        raw = vanishing.sock
        assert raw is not None
        raw.shutdown(socket.SHUT_RDWR)
        raw.close()
        web.wait_streams(sse=1, ws=1)

        # The server closes one: its session was deleted, and subscribing finds it gone (4404).
        r = requests.delete(f"{web.url}/v1/sessions/{other}", headers=web.headers, timeout=10)
        assert r.status_code == 200, r.text
        closed_by_server.send(json.dumps({"type": "subscribe", "after": 0}))
        assert json.loads(closed_by_server.recv())["error"]["code"] == "not_found"
        opcode, data = closed_by_server.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 4404
        web.wait_streams(sse=1, ws=0)

        sse.close()
        web.wait_streams(sse=0, ws=0)
