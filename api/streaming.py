"""Streaming routes: SSE, WebSocket, and the stream tokens browsers use for both.

Both streams start where the client says (``?after=`` / ``Last-Event-ID``) or,
without a cursor, at the log's head when they connect, and then follow the log
(:mod:`api.relay`). Everything a client can get wrong (auth, ownership, a bad
or expired cursor) is answered with a plain JSON error before the stream
starts, except an expired cursor on a WebSocket: browsers do not show a failed
handshake's status, so it is told in an error frame and a close reason.
"""
from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, Flask, Response, g, request
from flask_sock import Sock
from simple_websocket import Server

from api.auth import Credential, accepts_stream_token, credential, enforce_rate_limit
from api.context import db, int_arg, json_body, principal, runtime
from api.input_gate import ascii_int
from api.openapi import AFTER_INT, OBJ, SID, RouteDocs, header, op, query
from api.relay import recover_gone, sse_stream, take_stream_slot
from api.serialize import ts
from api.websocket import DeferredThread, WebSocketStream, close_all_for_restart, linger, refuse, start_reader
from shared.auth.stream_tokens import mint_stream_token
from shared.errors import BadInput, Gone, TooManyStreams, Unavailable
from shared.metrics import ACTIVE_STREAMS
from shared.streaming.protocol import MAX_CURSOR, Ring
from shared.turns import service as turns

bp = Blueprint("streaming", __name__, url_prefix="/v1/sessions")
sock = Sock()
# The transports counted in steprun_active_streams (api/relay.py for SSE and ?wait= long-polls, api/websocket.py).
STREAM_TRANSPORTS = ("sse", "ws", "poll")
# What a stream token may allow: read (the default) streams only; write also sends turn requests over WS.
SCOPES = ("read", "write")


def describe() -> RouteDocs:
    token = query("token", {"type": "string"},
                  "a stream token (POST .../stream-token), in place of the Authorization header")
    ws = op("WebSocket: the session's events as JSON text frames (after ?after=, else from now); the client sends "
            "turn, cancel, resume, subscribe and ping frames (turn, cancel and resume need a key, a JWT or a "
            "write stream token). Closes 4000 {reason: slow_consumer, cursor} when the client lags, 4410 when "
            "its cursor is too old, 4401 {reason: token_expired|key_revoked, cursor} when its credential ends, "
            "4429 {reason: too_many_streams, retry_after} when the user or tenant holds all its streams, 1008 "
            "{reason: frame_rate} when the client sends frames faster than allowed.",
            "101", OBJ, params=[SID, AFTER_INT, token], errors=("400", "401", "404", "429", "503"))
    ws["responses"]["101"] = {"description": "Switching Protocols (WebSocket)"}
    mint = _mint_docs()
    return RouteDocs({
        "/v1/sessions/{session_id}/events/stream": {"get": op(
            "The session's events as Server-Sent Events (id: cursor, event: type, data: the event); "
            "Last-Event-ID or ?after= resumes, else from now; a comment line as heartbeat; ends with an "
            "`error` event (code unauthorized) when its credential expires or its key is revoked", "200",
            {"type": "string"}, content_type="text/event-stream", errors=("400", "401", "404", "410", "429", "503"),
            params=[SID, AFTER_INT, header("Last-Event-ID", "resume after this cursor"), token])},
        "/v1/sessions/{session_id}/ws": {"get": ws},
        "/v1/sessions/{session_id}/stream-token": {"post": mint},
    }, schemas={"StreamTokenRequest": {"type": "object", "properties": {"scope": {
        "type": "string", "enum": list(SCOPES),
        "description": "read (default): the socket streams only; write: it may also send turn, cancel and "
                       "resume frames"}}}})


def _mint_docs() -> dict[str, Any]:
    mint = op("A short-lived token for this session's WebSocket and SSE streams (browsers cannot set headers)",
              "200", {"type": "object", "required": ["token", "expires_at"], "properties": {
                  "token": {"type": "string"}, "session_id": {"type": "string"},
                  "scope": {"type": "string", "enum": list(SCOPES)},
                  "expires_at": {"type": "string", "format": "date-time"}, "expires_in": {"type": "integer"}}},
              body="StreamTokenRequest", params=[SID], errors=("400", "401", "404", "429", "503"))
    mint["requestBody"]["required"] = False  # no body (or {}) mints a read-only token
    return mint


def install(app: Flask) -> None:
    """Register the streaming routes and the WebSocket server options."""
    settings = app.extensions["steprun"].settings
    app.config["SOCK_SERVER_OPTIONS"] = {
        # Required, not just advisable: with pings, simple-websocket reads only after select() says
        # there is data, which is what lets the socket carry a send timeout (api.relay.bound_socket).
        "ping_interval": max(0.5, settings.ws_ping_seconds),
        # A hard cap; frames between max_body_bytes and this get an error frame and the socket stays open.
        "max_message_size": 4 * settings.max_body_bytes,
        # Not started with the connection: under gevent the stream's greenlet reads the socket itself
        # (api/websocket.py); elsewhere the stream starts it.
        "thread_class": DeferredThread,
    }
    app.register_blueprint(bp)
    for transport in STREAM_TRANSPORTS:
        ACTIVE_STREAMS.labels(transport=transport)  # each series on /metrics from the start, at 0


def _start_cursor(session_id: str, *, header: bool) -> int:
    """The cursor to stream after: Last-Event-ID (SSE), ?after=, or the head of the log (now)."""
    raw = request.headers.get("Last-Event-ID", "").strip() if header else ""
    if raw:
        cursor = ascii_int("Last-Event-ID", raw)
        if not 0 <= cursor <= MAX_CURSOR:
            raise BadInput("Last-Event-ID must be a cursor (a non-negative integer)", field="Last-Event-ID")
        return cursor
    if request.args.get("after", "") != "":
        return int_arg("after", 0, lo=0, hi=MAX_CURSOR)
    return runtime().events.head(session_id)


def _own_session(session_id: str) -> None:
    """404 unless the session exists and is the caller's; then let the connection go."""
    turns.get_session(db(), principal(), session_id)
    # A stream must not hold a database connection, nor the session's objects, for its whole life.
    g.pop("db").close()


@bp.get("/<session_id>/events/stream")
@accepts_stream_token
def stream_events(session_id: str) -> Response:
    """The session's events as Server-Sent Events."""
    rt = runtime()
    _own_session(session_id)
    after = _start_cursor(session_id, header=True)
    who = principal()
    if after and rt.events.read(session_id, after, 1).gone:
        raise Gone(recover_gone(rt, who, session_id, after))
    raw_socket = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
    cred = credential()
    slot = take_stream_slot(rt, who)  # 429 too_many_streams when the user or tenant holds all of theirs
    body = _until_restart(sse_stream(rt.events, session_id, after, rt.settings, raw_socket,
                                     lambda cursor: recover_gone(rt, who, session_id, cursor),
                                     lambda: cred.problem(rt), cred.expires_at, _restartable_ring), after)
    response = Response(body, mimetype="text/event-stream", headers={
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # nginx and friends: do not buffer the stream
    })
    response.call_on_close(slot.release)  # however the body ends, or if it never starts
    return response


@bp.before_request
def _check_websocket() -> None:
    # flask-sock completes the handshake before the view runs, so a WebSocket's
    # ownership check and cursor parsing happen here, where they can still be HTTP errors.
    if request.endpoint == "streaming.stream_ws":
        session_id = (request.view_args or {})["session_id"]
        _own_session(session_id)
        g.stream_after = _start_cursor(session_id, header=False)
        # No permessage-deflate: simple-websocket cannot bound how far a compressed frame inflates (a 1 KB
        # frame became a 1 MB message), so the offer is dropped and every frame is as large as it is on the wire.
        request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


@sock.route("/<session_id>/ws", bp=bp)
@accepts_stream_token
def stream_ws(ws: Server, session_id: str) -> None:
    """The session's events over a WebSocket, and turn requests from the client."""
    rt = runtime()
    try:
        slot = take_stream_slot(rt, principal())
    except TooManyStreams as exc:  # the handshake is done: told in an error frame and the close reason (4429)
        start_reader(ws)
        refuse(ws, exc, g.stream_after)
        linger(ws)
        return
    try:
        WebSocketStream(ws, rt, principal(), session_id, g.stream_after, enforce_rate_limit, credential()).run()
    finally:
        slot.release()


@bp.post("/<session_id>/stream-token")
def create_stream_token(session_id: str) -> dict[str, Any]:
    """A short-lived token a browser passes as ?token= to the WebSocket and SSE routes."""
    rt = runtime()
    scope = json_body().get("scope", "read")
    if scope not in SCOPES:
        raise BadInput("'scope' must be read (the default: the socket only streams) or write (it may also "
                       "send turn, cancel and resume frames)", field="scope")
    turns.get_session(db(), principal(), session_id)
    if not rt.settings.secret_key:
        raise Unavailable("stream tokens are disabled: set STEPRUN_SECRET_KEY (the same value on every "
                          "web process) to enable them")
    minted_with: Credential = credential()
    ttl = rt.settings.stream_token_ttl
    if minted_with.expires_at is not None:  # a JWT's token lives no longer than the JWT
        ttl = max(0.0, min(ttl, minted_with.expires_at - time.time()))
    token, expires = mint_stream_token(rt.settings.secret_key, principal(), session_id, ttl,
                                       key_id=minted_with.key_id, write=scope == "write")
    return {"token": token, "session_id": session_id, "scope": scope,
            "expires_at": ts(datetime.fromtimestamp(expires, timezone.utc)),
            "expires_in": int(ttl)}


# --- closing streams when the web process shuts down (api/gunicorn_conf.py, on SIGTERM) ------------------

class _ServerRestart(BaseException):
    """Raised out of an SSE stream's wait when the process shuts down (a BaseException, so that nothing
    in the relay mistakes it for a failed read and retries)."""


_RESTARTING = threading.Event()
_SSE_RINGS: weakref.WeakSet[_RestartRing] = weakref.WeakSet()


class _RestartRing(Ring):
    """A stream's doorbell that also rings, and then raises, when the process shuts down."""

    def __init__(self, ring: Ring):  # wraps ``ring``: no event of its own, so no super().__init__()
        self._ring = ring

    def set(self, news: bytes | None = None) -> None:
        self._ring.set(news)

    def clear(self) -> None:
        self._ring.clear()

    def wait(self, timeout: float) -> bool:
        if _RESTARTING.is_set():
            raise _ServerRestart
        rang = self._ring.wait(timeout)
        if _RESTARTING.is_set():
            raise _ServerRestart
        return rang


@contextmanager
def _restartable_ring() -> Iterator[Ring]:
    """One SSE stream's wake-up flag, which a shutdown also rings (and then raises from), while it runs."""
    proxy = _RestartRing(Ring())
    _SSE_RINGS.add(proxy)
    try:
        yield proxy
    finally:
        _SSE_RINGS.discard(proxy)


def _until_restart(body: Iterator[str], after: int) -> Iterator[str]:
    """The SSE body, ended by a shutdown with ``event: error`` (code ``server_restart``, the last cursor)."""
    cursor = after
    try:
        for chunk in body:
            if chunk.startswith("id: "):  # frames: "id: C\nevent: T\ndata: {...}\n\n", joined; data has no newline
                at = chunk.rfind("\n\nid: ")
                at = 0 if at < 0 else at + 2
                cursor = int(chunk[at + 4:chunk.index("\n", at)])
            yield chunk
    except _ServerRestart:
        error = {"code": "server_restart", "message": "the server is restarting; reconnect with Last-Event-ID",
                 "cursor": cursor}
        yield f"event: error\ndata: {json.dumps({'error': error})}\n\n"


def close_streams_for_restart(app: Any) -> int:  # noqa: ARG001 - the app, for a later per-app registry
    """End every stream of this process: WebSockets close with 1012 and the cursor, SSE with an error event.
    Returns how many were open."""
    _RESTARTING.set()
    rings = list(_SSE_RINGS)
    for ring in rings:
        ring.set()
    return close_all_for_restart() + len(rings)
