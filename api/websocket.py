"""One WebSocket client of one session: events out, requests in.

One greenlet per connection (under gevent): the request's own greenlet reads
the client's frames and answers them, and follows the session's log through
its tail in this process (see :mod:`api.relay`), waiting on one ring that the
socket's input, the tail and the shutdown all set. One sender only: two on one
socket would interleave frames (flask-sock#57), and a send with no timeout
blocks forever on a client that stopped reading (research §2.5). Under
`steprun dev` (threads) simple-websocket's reader thread reads the socket and
sets the same ring.

Client frames (JSON text):
``{"type":"turn","input":...,"on_busy"?,"idempotency_key"?}`` -> ``{"type":"turn.created","turn":...}``,
``{"type":"cancel","turn_id":...}`` -> ``cancel.ok``, ``{"type":"resume","turn_id":...,"approve"?,
"input"?,"tool_outputs"?}`` -> ``resume.ok``, ``{"type":"subscribe","after":C}`` -> ``subscribe.ok``,
``{"type":"ping"}`` -> ``{"type":"pong"}``. A bad frame gets ``{"type":"error","error":{...}}``
and the socket stays open. Any frame may carry a ``ref`` that its reply echoes.
Replies have no ``cursor``; events always do.

A socket opened with a read-only stream token (the default scope) answers
``turn``, ``cancel`` and ``resume`` with an error frame (code ``forbidden``) and
does nothing. Every socket rechecks its credential (api.relay.recheck_seconds,
and at its expiry): a token that expired or a key that was revoked gets an
error frame (code ``unauthorized``) and the close 4401 ``{"reason":
"token_expired" | "key_revoked", "cursor": C}``.

Every frame the client sends counts against the socket's frame budget
(STEPRUN_WS_FRAMES_PER_SECOND, bursts of twice that), pings, malformed and
oversized frames included; a client over it is closed with 1008
``{"reason":"frame_rate","cursor":C}``. Frames are never compressed
(permessage-deflate is not offered, api/streaming.py), so a frame is as large as
it was on the wire and at most ``4 * STEPRUN_MAX_BODY_BYTES``.
"""
from __future__ import annotations

import fcntl
import json
import logging
import socket
import struct
import termios
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from redis.exceptions import RedisError
from simple_websocket import ConnectionClosed
from sqlalchemy.exc import OperationalError
from wsproto.events import CloseConnection, Ping
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from api.auth import Credential
from api.input_gate import parse_json
from api.relay import (
    POLL_SECONDS,
    CredentialWatch,
    CursorGone,
    Frame,
    LogFollower,
    SlowConsumer,
    StreamEnded,
    bound_socket,
    recover_gone,
)
from api.serialize import turn_json
from shared.auth.principal import Principal
from shared.db import unit_of_work
from shared.errors import BadInput, Forbidden, NotFound, StepRunError, TooLarge, Unavailable
from shared.metrics import track_stream
from shared.runtime import Runtime
from shared.streaming.protocol import MAX_CURSOR
from shared.turns import service as turns

log = logging.getLogger(__name__)

# Close codes (the 4000 range is the application's). The reason is JSON carrying the cursor to resume from.
CLOSE_SLOW = 4000
CLOSE_UNAVAILABLE = 4003
# The credential that opened the socket expired or its key was revoked: reconnect with a new one.
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_GONE = 4410
# The user or tenant holds all its stream slots (STEPRUN_MAX_STREAMS_PER_*): retry after ``retry_after`` seconds.
CLOSE_TOO_MANY_STREAMS = 4429
# Policy violation: the client sent frames faster than STEPRUN_WS_FRAMES_PER_SECOND.
CLOSE_FRAME_RATE = 1008
# The web process is shutting down (SIGTERM): reconnect, to another process, after the cursor in the reason.
CLOSE_RESTART = 1012
REPLY_QUEUE = 64
FRAME_TYPES = ("turn", "cancel", "resume", "subscribe", "ping")
# Frames that change a turn: refused on a socket opened with a read-only stream token.
WRITE_FRAMES = ("turn", "cancel", "resume")


# Every WebSocket this process serves, so a shutdown can close them all with a code (api/gunicorn_conf.py).
_OPEN: weakref.WeakSet[WebSocketStream] = weakref.WeakSet()


def close_all_for_restart() -> int:
    """Close every open WebSocket with 1012 and its cursor (``{"reason":"server_restart","cursor":C}``)."""
    streams = list(_OPEN)
    for stream in streams:
        if stream.ring is not None:
            stream._end(CLOSE_RESTART, "server_restart")
    return len(streams)


def refuse(ws: Any, exc: StepRunError, cursor: int) -> None:
    """Turn away an accepted WebSocket that may not stream (4429): an error frame, then the close with the reason."""
    error: dict[str, Any] = {"code": exc.code, "message": exc.message}
    reason: dict[str, Any] = {"reason": exc.code, "cursor": cursor}
    if exc.retry_after is not None:
        error["retry_after"] = reason["retry_after"] = exc.retry_after
    try:
        ws.send(json.dumps({"type": "error", "error": error}, separators=(",", ":")))
        ws.close(reason=CLOSE_TOO_MANY_STREAMS, message=json.dumps(reason, separators=(",", ":")))
    except (OSError, ConnectionClosed):
        pass


class FrameBudget:
    """A token bucket of client frames: ``rate`` a second, bursts of up to twice that (rate 0: unlimited)."""

    def __init__(self, rate: float):
        self.rate = max(0.0, rate)
        self.capacity = 2 * self.rate
        self.tokens = self.capacity
        self.at = time.monotonic()

    def take(self) -> bool:
        """Count one frame; False once the client is over its budget."""
        if not self.rate:
            return True
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def unsent_bytes(sock: Any) -> int | None:
    """Bytes written to ``sock`` that the peer has not acknowledged yet (Linux TIOCOUTQ); None if unknown."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return int(struct.unpack("i", raw)[0])
    except (OSError, ValueError, AttributeError):
        return None


def send_room(sock: Any) -> int:
    """How many unacknowledged bytes a frame may join without the write blocking: half the send buffer
    (the kernel counts its own overhead in SO_SNDBUF), so a close frame always fits beside them."""
    try:
        return max(8192, int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)) // 2)
    except (OSError, AttributeError):
        return 1 << 20


class _WholeWrites:
    """The connection's socket with whole-frame writes, one at a time.

    simple-websocket writes with a single ``sock.send`` (which may write part of
    a frame); writing with ``sendall`` instead keeps a frame whole, and, when
    its reader thread also writes (pongs, close replies: ``steprun dev``), a lock
    keeps frames from interleaving.
    """

    def __init__(self, sock: Any, threaded: bool):
        self._sock = sock
        self._lock = threading.Lock() if threaded else None

    def send(self, data: bytes) -> int:
        if self._lock is None:
            self._sock.sendall(data)
        else:
            with self._lock:
                self._sock.sendall(data)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _HandshakeDone:
    """Stands for a WebSocket's finished handshake (wsproto asks it for events, of which it has none)."""

    @staticmethod
    def events() -> Iterator[Any]:
        return iter(())


class DeferredThread:
    """simple-websocket's reader thread, not started with the connection (SOCK_SERVER_OPTIONS).

    Under gevent the stream's own greenlet reads the socket (one greenlet per connection, not three);
    elsewhere (``steprun dev``'s threads) :meth:`start_reading` starts simple-websocket's reader.
    """

    def __init__(self, target: Callable[[], None], **_: Any):
        self.target = target
        self.name = "simple-websocket reader"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Started on demand instead (see the class)."""

    def start_reading(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self.target, name=self.name, daemon=True)
            self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


def reads_itself() -> bool:
    """Whether a stream reads its own socket (gevent: a socket watcher wakes its one greenlet)."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency of the web process
        return False
    return bool(monkey.is_module_patched("socket"))


def start_reader(ws: Any) -> None:
    """Have simple-websocket's reader thread serve ``ws`` when no stream loop reads it (``steprun dev``)."""
    thread = getattr(ws, "thread", None)
    if isinstance(thread, DeferredThread) and not reads_itself():
        thread.start_reading()


def linger(ws: Any, seconds: float = 1.0) -> None:
    """After our close frame, read (and drop) what the client still sends until its close frame, for up to
    ``seconds``: closing a socket with unread input resets it, and a reset may cost the client our close
    frame. Only for sockets no reader thread reads (see :func:`reads_itself`)."""
    thread = getattr(ws, "thread", None)
    if not isinstance(thread, DeferredThread) or thread._thread is not None:
        return
    sock = ws.sock
    deadline = time.monotonic() + seconds
    try:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            if not data:
                return
            ws.ws.receive_data(data)
            if any(isinstance(event, CloseConnection) for event in ws.ws.events()):
                return
    except (OSError, LocalProtocolError):
        return


class WebSocketStream:
    """Serves one accepted WebSocket until either side closes it, from one greenlet.

    The greenlet both reads and writes: it waits on one ring, set by the session's tail (the log may
    have more), by the socket (input arrived; under gevent a socket watcher, elsewhere simple-websocket's
    reader thread), by a shutdown, or by its own timers (pings, the credential recheck, the poll).
    One sender only, so frames never interleave (flask-sock#57); every send is bounded (research §2.5).
    """

    def __init__(self, ws: Any, rt: Runtime, who: Principal, session_id: str, after: int,
                 rate_limit: Callable[[Principal], None], credential: Credential | None = None):
        self.ws, self.rt, self.who, self.session_id = ws, rt, who, session_id
        self.credential = credential or Credential("key")
        cred = self.credential
        self.watch = CredentialWatch(lambda: cred.problem(rt), rt.settings, cred.expires_at)
        self.settings = rt.settings
        self.follower = LogFollower(rt.events, session_id, after, rt.settings,
                                    lambda cursor: recover_gone(rt, who, session_id, cursor))
        self.rate_limit = rate_limit
        self.replies: list[tuple[str, Any]] = []
        # Set to have the loop close the socket (a shutdown, an over-budget client): (close code, reason).
        self.close_with: tuple[int, str] | None = None
        self.ring: Any = None
        self._readable = False
        self._watcher: Any = None
        self._room: int | None = None

    # --- lifecycle -----------------------------------------------------------

    def run(self) -> None:
        """Serve until either side closes; counted as one open ``ws`` stream for exactly that long."""
        with track_stream("ws"):
            self._run()

    def _run(self) -> None:
        ws = self.ws
        bound_socket(ws.sock, self.settings)
        manual = reads_itself() and isinstance(getattr(ws, "thread", None), DeferredThread)
        if getattr(ws.ws, "connection", None) is not None:
            ws.ws.handshake = _HandshakeDone  # the HTTP/1.1 upgrade's parser and request: not needed again
        ws.sock = _WholeWrites(ws.sock, threaded=not manual)
        with self.follower.listening() as ring:
            self.ring = ring
            if manual:
                from gevent.hub import get_hub

                self._watcher = get_hub().loop.io(ws.sock.fileno(), 1)  # 1: readable
                self._watcher.start(self._input_arrived)
            else:
                ws.event = ring  # simple-websocket's reader sets it for each message and at the close
                start_reader(ws)
            _OPEN.add(self)
            try:
                self._serve(manual)
            finally:
                _OPEN.discard(self)
                if self._watcher is not None:
                    self._watcher.stop()
                    self._watcher.close()
                    self._watcher = None
        if manual:
            linger(ws)

    def _input_arrived(self) -> None:
        # One-shot: a level-triggered watcher would fire at every turn of the loop until we read.
        self._watcher.stop()
        self._readable = True
        self.ring.set()

    def _pump(self) -> None:
        """Read what the socket has (it is readable: no wait) into simple-websocket's state."""
        if not self._readable:
            return
        self._readable = False
        ws = self.ws
        data = ws.sock.recv(ws.receive_bytes)
        if not data:
            ws.connected = False
            return
        ws.ws.receive_data(data)
        ws.connected = ws._handle_events()  # answers pings and the client's close, queues messages
        if ws.connected and self._watcher is not None:
            self._watcher.start(self._input_arrived)

    def _serve(self, manual: bool) -> None:
        ws = self.ws
        limit = self.settings.max_body_bytes
        budget = FrameBudget(self.settings.ws_frames_per_second)
        ping_every = ws.ping_interval if manual else None
        next_ping = time.monotonic() + ping_every if ping_every else None
        timed_out = False
        try:
            while True:
                self.ring.clear()
                if manual:
                    self._pump()
                while ws.input_buffer and self.close_with is None:
                    message = ws.input_buffer.pop(0)
                    # Counted before anything else is done with it: pings, malformed and oversized frames alike.
                    if not budget.take():
                        log.warning("websocket of session %s: over %s frames/s, closing", self.session_id,
                                    self.settings.ws_frames_per_second)
                        self._end(CLOSE_FRAME_RATE, "frame_rate")
                        break
                    size = len(message.encode() if isinstance(message, str) else message)
                    if size > limit:
                        self._post_error(TooLarge(f"a frame may hold at most {limit} bytes (this one: {size})"),
                                         None)
                    else:
                        self._handle(message)
                    self._send_replies()
                if self.close_with is not None:
                    code, reason = self.close_with
                    self._close(code, reason, self.follower.position)
                    return
                if not ws.connected:
                    return
                problem = self.watch.problem()
                if problem is not None:
                    self._send_json({"type": "error", "error": {"code": "unauthorized", "reason": problem[0],
                                                                "message": problem[1]}})
                    self._close(CLOSE_UNAUTHORIZED, problem[0], self.follower.position)
                    return
                frames = self.follower.next_frames(poll=timed_out)
                for frame in frames:
                    self._send_event(frame)
                if frames:
                    timed_out = False
                    continue
                bound = self.watch.wait_bound(POLL_SECONDS)
                if next_ping is not None:
                    now = time.monotonic()
                    if now >= next_ping:
                        if not ws.pong_received:
                            self._close(CloseReason.POLICY_VIOLATION, "Ping/Pong timeout", self.follower.position)
                            return
                        ws.pong_received = False
                        ws.sock.send(ws.ws.send(Ping()))
                        next_ping = max(now, next_ping) + ping_every
                    bound = min(bound, max(0.0, next_ping - now))
                timed_out = not self.ring.wait(bound) and bound >= POLL_SECONDS
        except CursorGone as exc:
            self._send_json({"type": "error", "error": {"code": exc.reason, "message": exc.message}})
            self._close(CLOSE_GONE, exc.reason, exc.cursor)
        except StreamEnded as exc:
            self._close(CLOSE_SLOW if exc.reason == "slow_consumer" else CLOSE_UNAVAILABLE, exc.reason, exc.cursor)
        except (OSError, ConnectionClosed, LocalProtocolError):
            # A write timed out or failed: part of a frame may be on the wire, so no clean close is
            # possible. Drop the connection; the client resumes from the last cursor it received.
            self._abort()
        except Exception:  # noqa: BLE001
            log.exception("websocket stream failed (session %s)", self.session_id)
            self._abort()

    # --- client frames -------------------------------------------------------

    def _handle(self, message: str | bytes) -> None:
        ref = kind = None
        try:
            if isinstance(message, bytes):
                raise BadInput("frames must be JSON text, not binary")
            frame = parse_json(message, what="the frame")
            if not isinstance(frame, dict):
                raise BadInput("a frame must be a JSON object with a 'type'")
            ref = frame.get("ref")
            ref = ref if isinstance(ref, (str, int)) and len(str(ref)) <= 128 else None
            kind = frame.get("type")
            if kind not in FRAME_TYPES:
                raise BadInput(f"unknown frame type {str(kind)[:64]!r}; known: {', '.join(FRAME_TYPES)}",
                               field="type")
            if kind == "ping":
                self._post("reply", {"type": "pong"}, ref)
                return
            self.rate_limit(self.who)
            if kind in WRITE_FRAMES and not self.credential.write:
                raise Forbidden(f"this socket was opened with a read-only stream token: {kind!r} is refused; "
                                "mint one with {\"scope\": \"write\"}, or connect with the key")
            if kind == "subscribe":
                after = frame.get("after")
                if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= MAX_CURSOR:
                    raise BadInput("'after' must be a cursor (a non-negative integer)", field="after")
                with unit_of_work(self.rt.sessions, scope=self.who) as db:
                    turns.get_session(db, self.who, self.session_id)
                self._post("subscribe", after, ref)
                return
            self._post("reply", self._turn_request(kind, frame), ref)
        except NotFound as exc:
            self._post_error(exc, ref)
            if kind == "subscribe":  # the session itself is gone (deleted) or not the caller's
                self._end(CLOSE_NOT_FOUND, "not_found")
        except StepRunError as exc:
            self._post_error(exc, ref)
        except (OperationalError, RedisError):
            log.warning("websocket frame: a dependency is down (session %s)", self.session_id, exc_info=True)
            self._post_error(Unavailable("a dependency is down; retry shortly", retry_after=2), ref)
        except Exception:  # noqa: BLE001 - one bad request must not take the socket down
            log.exception("websocket frame failed (session %s)", self.session_id)
            self._post("reply", {"type": "error", "error": {"code": "internal_error",
                                                             "message": "internal error"}}, ref)

    def _turn_request(self, kind: str, frame: dict[str, Any]) -> dict[str, Any]:
        """Create, cancel or resume a turn in its own short transaction."""
        with unit_of_work(self.rt.sessions, scope=self.who) as db:
            if kind == "turn":
                key = frame.get("idempotency_key")
                if key is not None and not isinstance(key, str):
                    raise BadInput("'idempotency_key' must be a string", field="idempotency_key")
                turn, created = turns.create_turn(db, self.rt, self.who, self.session_id,
                                                          frame.get("input"), frame.get("on_busy"), key)
                return {"type": "turn.created", "created": created, "turn": turn_json(turn)}
            turn_id = frame.get("turn_id")
            if not isinstance(turn_id, str) or not turn_id:
                raise BadInput("'turn_id' must name a turn of this session", field="turn_id")
            if turns.get_turn(db, self.who, turn_id).session_id != self.session_id:
                raise NotFound(f"no turn {turn_id!r} in this session")
            if kind == "cancel":
                turn = turns.cancel_turn(db, self.rt, self.who, turn_id)
            else:
                body = {k: frame.get(k) for k in ("approve", "input", "tool_outputs")}
                turn = turns.resume_turn(db, self.rt, self.who, turn_id, body)
            return {"type": f"{kind}.ok", "turn": turn_json(turn)}

    def _post_error(self, exc: StepRunError, ref: Any) -> None:
        error: dict[str, Any] = {"code": exc.code, "message": exc.message}
        if exc.field:
            error["field"] = exc.field
        if exc.retry_after is not None:
            error["retry_after"] = exc.retry_after
        self._post("reply", {"type": "error", "error": error}, ref)

    def _post(self, kind: str, value: Any, ref: Any) -> None:
        if kind == "reply" and ref is not None:
            value = dict(value, ref=ref)
        if len(self.replies) >= REPLY_QUEUE:
            # It sends requests faster than it reads the answers: treat it like any slow reader.
            self._end(CLOSE_SLOW, "slow_consumer")
            return
        self.replies.append((kind, value))

    def _end(self, code: int, reason: str) -> None:
        """Have the stream's loop close the socket (from any greenlet or thread)."""
        self.close_with = (code, reason)
        if self.ring is not None:
            self.ring.set()

    # --- sending ---------------------------------------------------------------

    def _send_replies(self) -> None:
        while self.replies:
            kind, value = self.replies.pop(0)
            if kind == "subscribe":
                self._reposition(value)
                value = {"type": "subscribe.ok", "after": value}
            self._send_json(value)

    def _reposition(self, after: int) -> None:
        """Move to ``after`` without sending anything twice.

        Forward: skip to it. Back, below where this socket started (``low``):
        send the older events it never sent, then carry on. In between: those
        were sent (or skipped on request) already, so nothing happens.
        """
        follower = self.follower
        if after >= follower.position:
            follower.position = after
            return
        cursor = after
        while cursor < follower.low:
            frames = follower.backfill_frames(cursor)
            for frame in frames:
                self._send_event(frame)
            if not frames or frames[-1].cursor >= follower.low:
                break
            cursor = frames[-1].cursor
        follower.low = min(follower.low, after)

    def _send_event(self, frame: Frame) -> None:
        wire = frame.wire()  # encoded once for every socket that sends it (server frames are not masked)
        self._await_room(len(wire))
        if not self.ws.connected:
            raise ConnectionClosed(self.ws.close_reason, self.ws.close_message)
        self.ws.sock.send(wire)
        self.follower.sent(frame.cursor)

    def _send_json(self, value: dict[str, Any]) -> None:
        text = json.dumps(value, separators=(",", ":"))
        self._await_room(len(text))
        self.ws.send(text)

    def _await_room(self, size: int) -> None:
        """Wait until a frame of ``size`` bytes can be written without blocking.

        A client that stops reading fills the kernel's send buffer; a write into a full one
        blocks, and one that times out leaves part of a frame on the wire, after which no close
        frame can be sent. So the writer never writes into a full buffer: it waits here, and a
        client that makes no room for STEPRUN_STREAM_SLOW_SECONDS is closed with 4000
        ``{"reason": "slow_consumer", "cursor": ...}``, which always fits.
        """
        sock = self.ws.sock
        if self._room is None:
            self._room = send_room(sock)
        room = self._room
        deadline = time.monotonic() + self.settings.stream_slow_seconds
        while True:
            unsent = unsent_bytes(sock)
            if unsent is None or unsent == 0 or unsent + size <= room:
                return
            if time.monotonic() >= deadline:
                raise SlowConsumer(self.follower.position, "the client stopped reading; reconnect with the "
                                                           "cursor to continue")
            time.sleep(0.05)

    def _close(self, code: int, reason: str, cursor: int) -> None:
        message = json.dumps({"reason": reason, "cursor": cursor}, separators=(",", ":"))
        try:
            self.ws.close(reason=code, message=message)
        except (OSError, ConnectionClosed):
            self._abort()

    def _abort(self) -> None:
        self.ws.connected = False
        try:
            self.ws.sock.shutdown(2)  # SHUT_RDWR: a reader thread, if any, notices at once
        except OSError:
            pass
