"""`steprun chat`: a terminal client that streams a conversation over the WebSocket.

It creates a session, sends each line read from stdin as a turn, prints the
answer as it streams, asks y/n when a turn waits for an approval, and, if the
connection drops, reconnects with ``?after=<last cursor>`` (to whichever API
process the URL reaches) and carries on without printing anything twice.

The answer goes to stdout; prompts and notices go to stderr, so
``steprun chat < questions.txt > answers.txt`` works.
"""
from __future__ import annotations

import json
import random
import secrets
import sys
import time
import urllib.error
import urllib.request
from typing import Any, TextIO

import websocket  # websocket-client

FINAL = {"turn.completed", "turn.failed", "turn.cancelled", "turn.expired", "turn.incomplete"}
RECONNECT_TRIES = 8


class ChatError(Exception):
    """The server refused something the chat cannot work around."""


class Chat:
    """One session, driven line by line."""

    def __init__(self, url: str, key: str, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
                 inp: TextIO = sys.stdin):
        self.url, self.key = url.rstrip("/"), key
        self.out, self.err, self.inp = out, err, inp
        self.session_id = ""
        self.cursor: int | None = None  # last event cursor received; None until the socket opens
        self.ws: websocket.WebSocket | None = None
        self.connects = 0
        self.pending: list[dict[str, Any]] = []  # events of a turn whose id we do not know yet

    # --- HTTP ---------------------------------------------------------------------

    def _http(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except Exception:  # noqa: BLE001 - not our JSON error: show the status
                message = exc.reason
            raise ChatError(f"{method} {path}: {exc.code} {message}") from None
        except urllib.error.URLError as exc:
            raise ChatError(f"cannot reach {self.url}: {exc.reason}") from None

    def start(self, agent: str | None, session_id: str | None = None) -> None:
        """Open (or create) the session and the socket."""
        if session_id:
            self.session_id = self._http("GET", f"/v1/sessions/{session_id}")["id"]
        else:
            if not agent:
                agents = self._http("GET", "/v1/agents")["data"]
                if not agents:
                    raise ChatError("this deployment serves no agents")
                agent = agents[0]["name"]
            self.session_id = self._http("POST", "/v1/sessions", {"agent": agent})["id"]
        self.note(f"session {self.session_id} with agent {agent or '?'}; type a message, Ctrl-D to quit")
        self._connect()

    # --- the socket ---------------------------------------------------------------

    def _connect(self) -> None:
        ws_url = "ws" + self.url[len("http"):] + f"/v1/sessions/{self.session_id}/ws"
        if self.cursor is not None:
            ws_url += f"?after={self.cursor}"
        self.ws = websocket.create_connection(ws_url, header=[f"Authorization: Bearer {self.key}"], timeout=60)
        self.connects += 1
        if self.cursor is None:
            self.cursor = 0

    def _reconnect(self, why: str) -> None:
        """Reconnect from the last cursor, backing off with jitter (so a restarted fleet is not stampeded)."""
        self.note(f"[connection lost: {why}; reconnecting]")
        for attempt in range(RECONNECT_TRIES):
            time.sleep(random.uniform(0, min(8.0, 0.25 * 2 ** attempt)))
            try:
                self._connect()
                return
            except websocket.WebSocketBadStatusException as exc:
                if exc.status_code in (401, 404, 410):
                    raise ChatError(f"cannot resume the stream: HTTP {exc.status_code}") from None
            except (OSError, websocket.WebSocketException):
                pass
        raise ChatError("could not reconnect")

    def _socket(self) -> websocket.WebSocket:
        if self.ws is None:
            raise ChatError("not connected: start() opens the socket")
        return self.ws

    def _send(self, frame: dict[str, Any]) -> None:
        while True:
            try:
                self._socket().send(json.dumps(frame))
                return
            except (OSError, websocket.WebSocketException) as exc:
                self._reconnect(type(exc).__name__)

    def _receive(self) -> dict[str, Any]:
        """The next frame; reconnects (resuming after the last cursor) if the connection drops."""
        while True:
            ws = self._socket()
            try:
                opcode, data = ws.recv_data(control_frame=False)
            except (OSError, websocket.WebSocketException) as exc:
                self._reconnect(type(exc).__name__)
                continue
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self._closed(data)
                continue
            frame = json.loads(data)
            cursor = frame.get("cursor")
            if cursor is not None:
                if cursor <= (self.cursor or 0):
                    continue  # never print an event twice, whatever the server does
                self.cursor = cursor
            return frame

    def _closed(self, data: bytes) -> None:
        code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
        reason = data[2:].decode(errors="replace")
        if code == 4410:
            raise ChatError("the stream expired (cursor too old); restart the chat to continue")
        if code == 4404:
            raise ChatError("the session no longer exists")
        self._reconnect(f"closed {code} {reason}".strip())

    # --- the conversation ---------------------------------------------------------

    def run(self) -> None:
        """Read lines until end of input; each one is a turn."""
        while True:
            if self.inp.isatty():
                self.err.write("you> ")
                self.err.flush()
            line = self.inp.readline()
            if not line:
                return
            if line.strip():
                self.turn(line.strip())

    def turn(self, text: str) -> str:
        """Send one input and stream the answer to its end; returns the final status."""
        # The key makes a resend after a dropped connection return the same turn, not a second one.
        frame = {"type": "turn", "input": text, "idempotency_key": "chat-" + secrets.token_hex(8)}
        self._send(frame)
        connects, turn_id = self.connects, None
        while turn_id is None:
            reply = self._receive()
            if self.connects != connects:
                # Reconnected before the answer: the frame may be lost; the same key makes resending safe.
                connects = self.connects
                self._send(frame)
            if reply.get("type") == "turn.created":
                turn_id = reply["turn"]["id"]
            elif reply.get("type") == "error":
                raise ChatError(reply["error"]["message"])
            elif "cursor" in reply:
                self.pending.append(reply)
        backlog, self.pending = self.pending, []
        for event in backlog:
            status = self._show(turn_id, event)
            if status:
                return status
        while True:
            status = self._show(turn_id, self._receive())
            if status:
                return status

    def _show(self, turn_id: str, event: dict[str, Any]) -> str | None:
        """Print one event of our turn; a final status when the turn is over."""
        if event.get("turn_id") != turn_id:
            return None
        kind, data = event.get("type"), event.get("data") or {}
        if kind == "message.delta":
            self.out.write(data.get("text", ""))
            self.out.flush()
        elif kind == "tool.call":
            self.note(f"[tool {data.get('name')}({json.dumps(data.get('arguments'))})]")
        elif kind == "step.retrying":
            # The earlier attempt's text was printed already; say so rather than pretend it was not.
            self.note(f"\n[step {data.get('step')} is being retried; its text restarts]")
        elif kind == "turn.requires_action":
            self._answer(turn_id, data)
        elif kind in FINAL:
            self.out.write("\n")
            self.out.flush()
            if kind != "turn.completed":
                error = (data.get("error") or {}).get("message", "")
                self.note(f"[{kind.split('.', 1)[1]}{': ' + error if error else ''}]")
            return kind.split(".", 1)[1]
        return None

    def _answer(self, turn_id: str, data: dict[str, Any]) -> None:
        pending = data.get("pending") or data
        if pending.get("reason") == "approval":
            calls = [c for c in pending.get("tool_calls", []) if c["id"] in pending.get("needs_approval", [])]
            names = ", ".join(f"{c['name']}({json.dumps(c.get('arguments'))})" for c in calls)
            self.err.write(f"approve {names}? [y/N] ")
            self.err.flush()
            answer = self.inp.readline().strip().lower()
            self._send({"type": "resume", "turn_id": turn_id, "approve": answer in ("y", "yes")})
        else:
            questions = [q.get("question") for q in pending.get("questions") or [] if q.get("question")]
            self.err.write(f"{' / '.join(questions) or 'the agent asks for input'}: ")
            self.err.flush()
            self._send({"type": "resume", "turn_id": turn_id, "input": self.inp.readline().strip()})

    def note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except (OSError, websocket.WebSocketException):
                pass
