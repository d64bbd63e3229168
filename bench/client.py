"""A small steprun client for load generation: keep-alive HTTP, and event streams.

Deliberately lighter than ``requests`` (http.client on one kept-alive
connection): the load generators share the machine's two cores with the
processes under test, so every microsecond the client spends is one the server
does not get.

Event streams follow DESIGN.md section 4/5. :class:`WebSocketStream` is the
``WS /v1/sessions/{id}/ws?after=C`` route (JSON event frames pushed by the
server); :class:`LongPollStream` is ``GET /v1/sessions/{id}/events?after=C&wait=S``.
:func:`open_stream` uses the WebSocket when the deployment serves it and falls
back to the long-poll route otherwise; ``stream.kind`` says which one ran.
"""
from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit


class HttpError(Exception):
    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status


class Http:
    """One kept-alive HTTP/1.1 connection with the bench key; reconnects once on a dropped connection."""

    def __init__(self, base_url: str, key: str, timeout: float = 90.0):
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201, 202)) -> Any:
        data = None if body is None else json.dumps(body).encode()
        for retry in (False, True):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=data, headers=self.headers)
                response = self._conn.getresponse()
                raw = response.read()
            except (http.client.HTTPException, ConnectionError, OSError):
                self.close()
                if retry:
                    raise
                continue
            if response.status not in ok:
                raise HttpError(response.status, raw)
            return json.loads(raw) if raw else None
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def create_session(http: Http, agent: str) -> str:
    return http.request("POST", "/v1/sessions", {"agent": agent})["id"]


def start_turn(http: Http, session_id: str, text: str) -> dict[str, Any]:
    return http.request("POST", f"/v1/sessions/{session_id}/turns", {"input": text})


def wait_turn(http: Http, turn_id: str, wait: float = 60.0) -> dict[str, Any]:
    """The long-polling client: one request that returns when the turn ends (or pauses)."""
    deadline = time.monotonic() + 300
    while True:
        turn = http.request("GET", f"/v1/turns/{turn_id}?wait={wait:g}")
        if turn["status"] not in ("queued", "in_progress") or time.monotonic() > deadline:
            return turn


class WebSocketUnavailable(Exception):
    """The deployment does not serve the WebSocket route (yet)."""


class WebSocketStream:
    kind = "websocket"

    def __init__(self, base_url: str, key: str, session_id: str, after: int | None = None, timeout: float = 90.0):
        import websocket  # websocket-client

        url = base_url.replace("http://", "ws://", 1) + f"/v1/sessions/{session_id}/ws"
        if after is not None:
            url += f"?after={after}"
        try:
            # websocket-client checks UTF-8 in pure Python unless told not to: at a few MB/s that alone
            # would make the load generator, not the server, the bottleneck of the fan-out scenario.
            self.ws = websocket.create_connection(url, header=[f"Authorization: Bearer {key}"], timeout=timeout,
                                                  enable_multithread=False, skip_utf8_validation=True)
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code in (400, 404, 405):
                raise WebSocketUnavailable(str(exc)) from None
            raise
        self.cursor = after or 0

    def raw_frames(self) -> Iterator[str]:
        """Frames as text, undecoded (the fan-out counter only searches them)."""
        import websocket

        while True:
            try:
                frame = self.ws.recv()
            except websocket.WebSocketConnectionClosedException:
                return
            if not frame:
                return
            yield frame if isinstance(frame, str) else frame.decode()

    def events(self) -> Iterator[dict[str, Any]]:
        for frame in self.raw_frames():
            for event in _decode_frame(frame):
                self.cursor = max(self.cursor, int(event.get("cursor") or 0))
                yield event

    def close(self) -> None:
        try:
            self.ws.close(timeout=1)
        except Exception:  # noqa: BLE001 - closing a socket the server already dropped
            pass


def _decode_frame(frame: str) -> list[dict[str, Any]]:
    """A frame holds one event, or a list of them, or a {"data": [...]} batch; anything else is ignored."""
    value = json.loads(frame)
    if isinstance(value, list):
        return [e for e in value if isinstance(e, dict) and "type" in e]
    if isinstance(value, dict):
        if "type" in value and "cursor" in value:
            return [value]
        if isinstance(value.get("data"), list):
            return [e for e in value["data"] if isinstance(e, dict)]
    return []


class LongPollStream:
    kind = "long-poll"

    def __init__(self, base_url: str, key: str, session_id: str, after: int | None = None, wait: float = 30.0):
        self.http = Http(base_url, key)
        self.path = f"/v1/sessions/{session_id}/events"
        self.wait = wait
        if after is None:  # "from the moment of connecting", as the WebSocket does without ?after
            after = self.http.request("GET", f"{self.path}?after=0&limit=1000")["next"]
            while True:
                page = self.http.request("GET", f"{self.path}?after={after}&limit=1000")
                if not page["data"]:
                    break
                after = page["next"]
        self.cursor = after

    def raw_pages(self) -> Iterator[bytes]:
        """Response bodies, undecoded except for the cursor (the fan-out counter only searches them)."""
        conn = self.http
        while True:
            if conn._conn is None:
                conn._conn = http.client.HTTPConnection(conn.host, conn.port, timeout=self.wait + 30)
            try:
                conn._conn.request("GET", f"{self.path}?after={self.cursor}&wait={self.wait:g}",
                                   headers=conn.headers)
                response = conn._conn.getresponse()
                raw = response.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                return
            if response.status != 200:
                raise HttpError(response.status, raw)
            tail = raw.rfind(b'"next":')
            self.cursor = int(raw[tail + 7:].rstrip(b"} \n"))
            yield raw

    def events(self) -> Iterator[dict[str, Any]]:
        for raw in self.raw_pages():
            yield from json.loads(raw)["data"]

    def close(self) -> None:
        self.http.close()


def open_stream(base_url: str, key: str, session_id: str, after: int | None = None,
                prefer: str = "websocket", wait: float = 30.0) -> WebSocketStream | LongPollStream:
    """The WebSocket stream if the deployment serves it, else the JSON long-poll route."""
    if prefer == "websocket":
        try:
            return WebSocketStream(base_url, key, session_id, after)
        except WebSocketUnavailable:
            pass
    return LongPollStream(base_url, key, session_id, after, wait)


def websocket_available(base_url: str, key: str, session_id: str) -> bool:
    try:
        WebSocketStream(base_url, key, session_id).close()
        return True
    except WebSocketUnavailable:
        return False
