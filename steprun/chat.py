"""`steprun chat`: a terminal client that streams a conversation over the WebSocket.

It creates (or, with ``--session``, continues) a session, sends each line as a
turn, prints the answer as it streams, and asks when a turn waits for an
approval or an answer. Ctrl-C cancels the running turn; a second one quits.

The connection is read by a background thread, so the prompt stays usable
while it is down. If it drops, the thread reconnects with ``?after=<last
cursor>`` (to whichever API process the URL reaches) and resends every request
still unanswered: a message typed while reconnecting is sent once the
connection is back, exactly once (each turn carries an idempotency key). If
the server no longer has the events after the cursor (410, a restarted
``steprun dev``), the chat reads the turn from the history and carries on.

The answer goes to stdout; prompts and notices go to stderr, so
``steprun chat < questions.txt > answers.txt`` works.
"""
from __future__ import annotations

import json
import queue
import random
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, TextIO

import websocket  # websocket-client

FINAL = {"turn.completed", "turn.failed", "turn.cancelled", "turn.expired", "turn.incomplete"}
# How long the chat keeps trying to reconnect before it gives up.
RECONNECT_SECONDS = 300.0
# Close codes after which reconnecting is pointless.
CLOSE_NOT_FOUND, CLOSE_GONE = 4404, 4410
_GAP = "_gap"  # a marker frame: events may have been missed (the reader reconnected from "now")


class ChatError(Exception):
    """The server refused something the chat cannot work around."""


class Chat:
    """One session, driven line by line."""

    def __init__(self, url: str, key: str, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
                 inp: TextIO = sys.stdin, reconnect_seconds: float = RECONNECT_SECONDS):
        self.url, self.key = url.rstrip("/"), key
        self.out, self.err, self.inp = out, err, inp
        self.reconnect_seconds = reconnect_seconds
        self.session_id = ""
        self.agent = ""
        self.cursor: int | None = None  # last event cursor received; None: start from the log's head
        self.ws: websocket.WebSocket | None = None
        self.connects = 0
        self.frames: queue.Queue[dict[str, Any]] = queue.Queue()
        # Requests not answered yet, by ref: resent after every reconnect (turns carry an idempotency key).
        self.outbox: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._reader: threading.Thread | None = None
        self._printed: set[tuple[str, Any]] = set()  # (turn, step) whose text was printed
        self._fatal: ChatError | None = None
        self._tty = self._isatty(inp) and self._isatty(out)
        if self._tty:
            try:
                import readline  # noqa: F401 - line editing and history for input()
            except ImportError:  # pragma: no cover - not on every platform
                pass

    @staticmethod
    def _isatty(stream: Any) -> bool:
        try:
            return bool(stream.isatty())
        except (AttributeError, ValueError):
            return False

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
        """Open (or create) the session and the socket; with a session, pick up its active turn."""
        active = None
        if session_id:
            session = self._http("GET", f"/v1/sessions/{session_id}")
            self.session_id, self.agent = session["id"], session.get("agent") or "?"
            active = session.get("active_turn_id")
        else:
            if not agent:
                agents = self._http("GET", "/v1/agents")["data"]
                if not agents:
                    raise ChatError("this deployment serves no agents")
                agent = agents[0]["name"]
            self.session_id, self.agent = self._http("POST", "/v1/sessions", {"agent": agent})["id"], agent
            self.cursor = 0  # a new session's log is empty: every event is ours
        self.note(f"session {self.session_id} with agent {self.agent}; type a message "
                  "(Ctrl-C cancels a running turn, Ctrl-D quits)")
        try:
            self._connect()
        except websocket.WebSocketBadStatusException as exc:
            raise ChatError(f"the server refused the stream: HTTP {exc.status_code}") from None
        except (OSError, websocket.WebSocketException) as exc:
            raise ChatError(f"cannot reach {self.url}: {exc}") from None
        self._reader = threading.Thread(target=self._read_loop, name="chat-reader", daemon=True)
        self._reader.start()
        if active:
            self.follow(active)

    # --- the socket (the reader thread) ----------------------------------------------

    def _connect(self) -> None:
        ws_url = "ws" + self.url[len("http"):] + f"/v1/sessions/{self.session_id}/ws"
        if self.cursor is not None:
            ws_url += f"?after={self.cursor}"
        ws = websocket.create_connection(ws_url, header=[f"Authorization: Bearer {self.key}"], timeout=30)
        ws.settimeout(None)  # the reader blocks until a frame comes; pings keep the server's side alive
        with self._lock:
            self.ws = ws
            self.connects += 1
            pending = list(self.outbox.values())
        for frame in pending:  # what the last connection may have lost
            self._send_now(frame)

    def _read_loop(self) -> None:
        while not self._closing.is_set():
            ws = self.ws
            try:
                if ws is None:
                    raise ConnectionError("not connected")
                opcode, data = ws.recv_data(control_frame=False)
            except (OSError, websocket.WebSocketException) as exc:
                if self._closing.is_set():
                    return
                self._reconnect(type(exc).__name__)
                continue
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                if self._closing.is_set():
                    return  # the answer to our own close
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                reason = data[2:].decode(errors="replace")
                if code == CLOSE_NOT_FOUND:
                    self._fail(ChatError("the session no longer exists"))
                    return
                if code == CLOSE_GONE:
                    self._restart_from_now("the server no longer has the events after our cursor")
                    continue
                self._reconnect(f"closed {code} {reason}".strip())
                continue
            try:
                frame = json.loads(data)
            except ValueError:
                continue
            cursor = frame.get("cursor")
            if cursor is not None:
                if self.cursor is not None and cursor <= self.cursor:
                    continue  # never show an event twice, whatever the server does
                self.cursor = cursor
            elif frame.get("type") == "error" and (frame.get("error") or {}).get("code") == "cursor_expired":
                continue  # the 4410 close that follows says the same
            ref = frame.get("ref")
            if ref is not None:
                with self._lock:
                    self.outbox.pop(str(ref), None)
            self.frames.put(frame)

    def _reconnect(self, why: str) -> None:
        """Reconnect from the last cursor, backing off with jitter (a restarted fleet is not stampeded)."""
        self.note(f"[connection lost: {why}; reconnecting]")
        deadline = time.monotonic() + self.reconnect_seconds
        attempt = 0
        while not self._closing.is_set():
            time.sleep(random.uniform(0.05, min(4.0, 0.25 * 2 ** attempt)))
            attempt += 1
            try:
                from_now = self.cursor is None
                self._connect()
                self.note("[reconnected]")
                if from_now:  # nothing received before the drop: what happened meanwhile is read from the turn
                    self.frames.put({"type": _GAP})
                return
            except websocket.WebSocketBadStatusException as exc:
                if exc.status_code == 410:
                    self._restart_from_now("the server no longer has the events after our cursor")
                    return
                if exc.status_code in (401, 403, 404):
                    self._fail(ChatError(f"cannot resume the stream: HTTP {exc.status_code}"))
                    return
            except (OSError, websocket.WebSocketException):
                pass
            if time.monotonic() > deadline:
                self._fail(ChatError(f"could not reconnect within {self.reconnect_seconds:g}s"))
                return

    def _restart_from_now(self, why: str) -> None:
        """The events after our cursor are gone (a restarted `steprun dev`): follow from now, and tell the
        conversation to read what it missed from the history."""
        self.note(f"[{why}; reading the history and carrying on]")
        self.cursor = None
        try:
            self._connect()
        except (OSError, websocket.WebSocketException) as exc:
            self._reconnect(type(exc).__name__)
            return
        self.frames.put({"type": _GAP})

    def _fail(self, error: ChatError) -> None:
        self._fatal = error
        self._closing.set()
        self.frames.put({"type": "_fatal"})

    def _send_now(self, frame: dict[str, Any]) -> None:
        ws = self.ws
        if ws is None:
            return
        try:
            ws.send(json.dumps(frame))
        except (OSError, websocket.WebSocketException):
            pass  # the reader notices the drop, reconnects and resends what is unanswered

    def request(self, frame: dict[str, Any]) -> str:
        """Send a request; until its reply comes it is resent after every reconnect. Returns its ref."""
        ref = "c" + secrets.token_hex(6)
        frame = dict(frame, ref=ref)
        with self._lock:
            self.outbox[ref] = frame
        self._send_now(frame)
        return ref

    def _next(self, timeout: float = 0.2) -> dict[str, Any] | None:
        try:
            frame = self.frames.get(timeout=timeout)
        except queue.Empty:
            return None
        if frame.get("type") == "_fatal" and self._fatal is not None:
            raise self._fatal
        return frame

    # --- the conversation ---------------------------------------------------------

    def run(self) -> None:
        """Read lines until end of input (or Ctrl-C at the prompt); each one is a turn."""
        while True:
            try:
                line = self._read_line("you> ")
            except (EOFError, KeyboardInterrupt):
                if self._tty:
                    self.err.write("\n")
                return
            if line is None:
                return
            if line.strip():
                if self.turn(line.strip()) == "quit":
                    return

    def _read_line(self, prompt: str) -> str | None:
        if self._fatal is not None:
            raise self._fatal
        if self._tty:
            return input(prompt)  # readline: editing, history, arrow keys never reach the agent
        if self._isatty(self.inp):
            self.err.write(prompt)
            self.err.flush()
        line = self.inp.readline()
        return line if line else None

    def turn(self, text: str) -> str:
        """Send one input and stream the answer to its end; returns the final status (or "quit")."""
        # The key makes a resend after a dropped connection return the same turn, not a second one.
        ref = self.request({"type": "turn", "input": text, "idempotency_key": "chat-" + secrets.token_hex(8)})
        turn_id: str | None = None
        early: list[dict[str, Any]] = []  # events that came before we knew our turn's id
        while turn_id is None:
            try:
                frame = self._next()
            except KeyboardInterrupt:
                self.note("[quit]")
                return "quit"
            if frame is None:
                continue
            if frame.get("ref") == ref:
                if frame.get("type") == "error":
                    raise ChatError(frame["error"]["message"])
                if frame.get("type") == "turn.created":
                    turn_id = frame["turn"]["id"]
            elif frame.get("type") == _GAP:
                early.clear()
            elif "cursor" in frame:
                early.append(frame)
        for event in early:
            status = self._show(turn_id, event)
            if status:
                return status
        return self._stream(turn_id)

    def follow(self, turn_id: str) -> str | None:
        """Pick up a turn already under way (``--session``): answer its pause, or stream it to the end."""
        turn = self._http("GET", f"/v1/turns/{turn_id}")
        status = turn.get("status")
        if status == "requires_action":
            self.note(f"[turn {turn_id} is waiting for you]")
            self._answer(turn_id, turn.get("pending") or {})
        elif status in ("queued", "running"):
            self.note(f"[turn {turn_id} is {status}; following it]")
        else:
            return status
        return self._stream(turn_id)

    def _stream(self, turn_id: str) -> str:
        # A Ctrl-C can land anywhere in the loop, the cancel's own sending included: the handler only
        # counts it, and the loop acts on the count, so a second one always quits.
        interrupts, cancelling = 0, False
        while True:
            try:
                if interrupts > 1:
                    self.note("[quit]")
                    return "quit"
                if interrupts and not cancelling:
                    cancelling = True
                    self.note("\n[cancelling the turn; Ctrl-C again to quit]")
                    self.request({"type": "cancel", "turn_id": turn_id})
                    continue
                status = self._step(turn_id, self._next())
                if status:
                    return status
            except KeyboardInterrupt:
                interrupts += 1

    def _step(self, turn_id: str, frame: dict[str, Any] | None) -> str | None:
        """Handle one frame of the stream of our turn; a final status when the turn is over."""
        if frame is None:
            return None
        if frame.get("type") == _GAP:
            return self._catch_up(turn_id)
        if frame.get("type") == "error" and frame.get("ref"):
            self.note(f"[{frame['error'].get('message')}]")
            return None
        return self._show(turn_id, frame)

    def _catch_up(self, turn_id: str) -> str | None:
        """After a gap in the stream: the turn as the history has it; a final status if it is over."""
        turn = self._http("GET", f"/v1/turns/{turn_id}")
        status = str(turn.get("status"))
        if "turn." + status in FINAL:
            printed = any(t == turn_id for t, _ in self._printed)
            if turn.get("output") and not printed:
                self.out.write(turn["output"])
            return self._show(turn_id, {"type": "turn." + status, "turn_id": turn_id,
                                        "data": {"error": turn.get("error")}})
        if status == "requires_action":
            self._answer(turn_id, turn.get("pending") or {})
        return None

    def _show(self, turn_id: str, event: dict[str, Any]) -> str | None:
        """Print one event of our turn; a final status when the turn is over."""
        if event.get("turn_id") != turn_id:
            return None
        kind, data = event.get("type"), event.get("data") or {}
        if kind == "message.delta":
            self._printed.add((turn_id, data.get("step")))
            self.out.write(data.get("text", ""))
            self.out.flush()
        elif kind == "tool.call":
            self.note(f"[tool {data.get('name')}({json.dumps(data.get('arguments'))})]")
        elif kind == "step.retrying":
            # Only if part of this step's text was printed: then say it starts over.
            if (turn_id, data.get("step")) in self._printed:
                self._printed.discard((turn_id, data.get("step")))
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
            answer = self._ask(f"approve {names}? [y/N] ").strip().lower()
            self.request({"type": "resume", "turn_id": turn_id, "approve": answer in ("y", "yes")})
        else:
            questions = [q.get("question") for q in pending.get("questions") or [] if q.get("question")]
            answer = self._ask(f"{' / '.join(questions) or 'the agent asks for input'}: ")
            self.request({"type": "resume", "turn_id": turn_id, "input": answer.strip()})

    def _ask(self, prompt: str) -> str:
        if self._tty:
            self.out.flush()
            return input(prompt)
        self.err.write(prompt)
        self.err.flush()
        return self.inp.readline()

    def note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def close(self) -> None:
        self._closing.set()
        ws = self.ws
        if ws is not None:
            try:
                ws.close()
            except (OSError, websocket.WebSocketException):
                pass
