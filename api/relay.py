"""Relaying a session's event log to one streaming client (SSE or WebSocket).

The log in Redis is the buffer; the API process holds almost nothing per
client. A :class:`LogFollower` remembers the last cursor the client was sent
and always reads the log *after* it, so backlog and live events are the same
code path: no gap and no duplicate when a client switches from one to the
other, or reconnects to another API process. It reads at most
``stream_buffer`` events at a time (the connection's bounded buffer), merges
consecutive deltas in them (a lagging client gets fewer, larger frames), and
gives up on a client that stays a full buffer behind for ``stream_slow_seconds``.

Every write to a client is bounded by a timeout on the connection's socket, so
a client that stops reading can pin one greenlet for at most
``stream_send_timeout`` seconds, and the worker producing the events never
notices it at all (it only writes to Redis).
"""
from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from api.auth import Credential
from shared.auth.principal import Principal, Scope
from shared.errors import TooManyStreams
from shared.metrics import track_stream
from shared.runtime import Runtime
from shared.settings import Settings
from shared.streaming.protocol import EventLog, Ring
from shared.streaming.slots import Slot, SlotLimits
from shared.streaming.tail import Frame, SessionTail, coalesce, parse_frame, tails_of
from shared.turns.events import republish_session

log = logging.getLogger(__name__)
# How often a waiting stream re-reads the log even if no doorbell rang (a lost ring costs this much delay).
POLL_SECONDS = 5.0
# A stream whose log cannot be read (Redis down) for this long is ended so the client retries elsewhere.
UNAVAILABLE_SECONDS = 10.0
# Retry-After of a stream refused because its user or tenant holds all its stream slots.
STREAM_RETRY_SECONDS = 5.0
# A session's tail in each process keeps this many connection buffers (STEPRUN_STREAM_BUFFER) of recent events.
TAIL_BUFFERS = 4


def take_stream_slot(rt: Runtime, who: Principal) -> Slot:
    """One of ``who``'s stream slots (and of its tenant), for a response that stays open; release it when done.

    Raises TooManyStreams (429, ``too_many_streams``) when the user already holds
    STEPRUN_MAX_STREAMS_PER_USER open streams or the tenant STEPRUN_MAX_STREAMS_PER_TENANT.
    """
    limits = SlotLimits(rt.settings.max_streams_per_user, rt.settings.max_streams_per_tenant)
    got = rt.stream_slots.acquire(who.tenant_id, who.user_id, limits)
    if isinstance(got, str):
        limit, setting = ((limits.per_user, "STEPRUN_MAX_STREAMS_PER_USER") if got == "user"
                          else (limits.per_tenant, "STEPRUN_MAX_STREAMS_PER_TENANT"))
        raise TooManyStreams(f"this {got} already holds {limit} open streams (WebSockets, SSE streams and ?wait= "
                             f"requests, {setting}); close one, or retry later", retry_after=STREAM_RETRY_SECONDS)
    return got


@contextmanager
def waiting_slot(rt: Runtime, who: Principal) -> Iterator[None]:
    """A long-poll (``?wait=``) holds a connection like a stream: a slot, and ``poll`` in steprun_active_streams."""
    slot = take_stream_slot(rt, who)
    try:
        with track_stream("poll"):
            yield
    finally:
        slot.release()


class StreamEnded(Exception):
    """The stream must end; ``cursor`` is the last one the client was sent."""

    reason = "ended"

    def __init__(self, cursor: int, message: str = ""):
        super().__init__(message or self.reason)
        self.cursor = cursor
        self.message = message


class CursorGone(StreamEnded):
    reason = "cursor_expired"


class SlowConsumer(StreamEnded):
    reason = "slow_consumer"


class LogUnavailable(StreamEnded):
    reason = "unavailable"


def gone_message(session_id: str, cursor: int, since: int | None = None) -> str:
    where = (f"the log continues after cursor {since} (stream with after={since}: it replays each recent "
             "step's committed text and each turn's end); " if since is not None else "")
    return (f"events after cursor {cursor} are no longer kept; {where}read the history at "
            f"/v1/sessions/{session_id}/messages, or stream from now on (omit 'after')")


def recover_gone(rt: Runtime, who: Scope, session_id: str, after: int) -> str:
    """A reader found its cursor gone: put the session's durable events back in the log (each once),
    and say where to read on. The message of the 410 / close frame."""
    try:
        republish_session(rt, who, session_id)
        since = rt.events.read(session_id, after, 1).since
    except Exception:  # noqa: BLE001 - Redis or Postgres away: the client is still told, without a cursor
        log.warning("session %s: republishing for a gone cursor failed", session_id, exc_info=True)
        since = None
    return gone_message(session_id, after, since)


class _Following:
    """``with follower.listening() as ring:`` (a class, not a generator: one fewer frame kept per stream)."""

    __slots__ = ("follower", "ring")

    def __init__(self, follower: LogFollower, ring: Ring):
        self.follower, self.ring = follower, ring

    def __enter__(self) -> Ring:
        self.follower.join(self.ring)
        return self.ring

    def __exit__(self, *exc: object) -> None:
        self.follower.leave(self.ring)


class LogFollower:
    """One client's position in one session's log: what it was sent, what it gets next.

    Its events come through the session's tail in this process (shared/streaming/tail.py): one
    read of the log per doorbell ring for every follower of the session, each taking its frames
    after its own position; a follower outside what the tail holds reads the log itself.
    """

    __slots__ = ("events", "session_id", "recover", "position", "low", "batch", "slow_seconds", "caught_up_at",
                 "_failing_since", "_tails", "tail")

    def __init__(self, events: EventLog, session_id: str, after: int, settings: Settings,
                 recover: Callable[[int], str] | None = None):
        self.events, self.session_id = events, session_id
        # Called with a cursor found gone: republishes what it can and returns the message to send.
        self.recover = recover
        # Every event in (low, position] was sent to this client or skipped at its request; nothing
        # outside it was sent. A client may ask for older events (below low), never for these again.
        self.position = after
        self.low = after
        self.batch = max(1, settings.stream_buffer)
        self.slow_seconds = settings.stream_slow_seconds
        self.caught_up_at = time.monotonic()
        self._failing_since: float | None = None
        self._tails = tails_of(events, capacity=min(TAIL_BUFFERS * self.batch, max(1, settings.event_log_max)),
                               read_limit=self.batch)
        self.tail: SessionTail | None = None

    def listening(self, ring: Ring | None = None) -> _Following:
        """Follow the session's tail for a ``with`` block, which gives the ring (``ring``, or a new one):
        set when the log may have more (clear it, take the next frames, then wait on it)."""
        return _Following(self, ring or Ring())

    def join(self, ring: Ring) -> None:
        self.tail = self._tails.join(self.session_id, ring)

    def leave(self, ring: Ring) -> None:
        tail, self.tail = self.tail, None
        if tail is not None:
            self._tails.leave(self.session_id, tail, ring)

    def next_frames(self, poll: bool = False) -> list[Frame]:
        """The next events to send (coalesced when the client lags); [] when it is at the head.

        ``poll``: the follower waited a whole POLL_SECONDS without a ring; the log is read again in case
        one was lost."""
        got = self._take(self.position, poll)
        if got is None:
            return []
        frames, gone = got
        if gone:
            raise CursorGone(self.position, self._gone_message(self.position))
        now = time.monotonic()
        if len(frames) < self.batch:
            self.caught_up_at = now
        elif now - self.caught_up_at > self.slow_seconds:
            raise SlowConsumer(self.position, "the client fell too far behind the stream; "
                                              "reconnect with the cursor to continue")
        if len(frames) <= 1:
            return frames
        return self.tail.merged(frames) if self.tail is not None else coalesce(frames)

    def backfill_frames(self, after: int) -> list[Frame]:
        """Events in (after, low] that were never sent, when a client repositions to an older cursor."""
        got = self._take(after, False)
        if got is None:
            return []
        frames, gone = got
        if gone:
            raise CursorGone(self.position, self._gone_message(after))
        return [f for f in frames if f.cursor <= self.low]

    def _gone_message(self, after: int) -> str:
        return self.recover(after) if self.recover else gone_message(self.session_id, after)

    def sent(self, cursor: int) -> None:
        """Record that the event with ``cursor`` reached the client's socket."""
        if cursor > self.position:
            self.position = cursor

    def _take(self, after: int, poll: bool) -> tuple[list[Frame], bool] | None:
        try:
            if self.tail is not None:
                got = self.tail.take(after, self.batch, POLL_SECONDS if poll else None)
            else:
                batch = self.events.read(self.session_id, after, self.batch)
                got = ([parse_frame(text) for text in batch.events], batch.gone)
        except Exception:  # noqa: BLE001 - Redis down: retry on the next round, end the stream if it lasts
            now = time.monotonic()
            self._failing_since = self._failing_since or now
            log.warning("stream of session %s: the event log is unreadable", self.session_id, exc_info=True)
            if now - self._failing_since > UNAVAILABLE_SECONDS:
                raise LogUnavailable(self.position, "the event store is unavailable; reconnect "
                                                    "with the cursor shortly") from None
            time.sleep(0.5)
            return None
        self._failing_since = None
        return got


def bound_socket(sock: Any, settings: Settings) -> Any:
    """Make every blocking write on ``sock`` time out, and apply the configured send buffer.

    The timeout lives on the socket rather than in a ``gevent.Timeout`` around
    our own sends because it must also bound the writes we do not make
    ourselves (gunicorn writing SSE chunks, simple-websocket's pongs and close
    frames); under gevent it is a gevent timer all the same.
    Returns the previous timeout, to restore.
    """
    if sock is None:
        return None
    previous = sock.gettimeout()
    sock.settimeout(settings.stream_send_timeout)
    if settings.stream_send_buffer > 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.stream_send_buffer)
        except OSError:  # pragma: no cover - not a TCP socket (e.g. a test transport)
            pass
    return previous


def sse_frame(frame: Frame) -> str:
    return f"id: {frame.cursor}\nevent: {frame.type}\ndata: {frame.text}\n\n"


# Answers None while a stream's credential is valid, else (reason, message): see api.auth.Credential.
CredentialCheck = Callable[[], "tuple[str, str] | None"]


def recheck_seconds(settings: Settings) -> float:
    """How often an open stream rechecks its credential: half the key-cache window (answers about a key
    are cached the other half), so a revoked key's streams end within STEPRUN_KEY_CACHE_SECONDS."""
    return max(0.5, settings.key_cache_seconds / 2) if settings.key_cache_seconds > 0 else 1.0


def rechecked(rt: Runtime, cred: Credential, body: Iterator[str],
              ending: Callable[[tuple[str, str], str | None], str]) -> Iterator[str]:
    """``body`` (a compatible surface's SSE stream), ended once ``cred`` (the request's credential, which
    opened it) stops being valid.

    The credential is rechecked between the stream's writes (its frames and its keep-alives), on the
    request's credential and at its expiry, as the main SSE and WebSocket routes do; then the stream
    ends with ``ending(problem, last chunk sent)`` (its surface's own error event) and ``body`` is closed.
    """
    watch = CredentialWatch(lambda: cred.problem(rt), rt.settings, cred.expires_at)
    last: str | None = None
    try:
        for chunk in body:
            problem = watch.problem()
            if problem is not None:
                log.info("stream: ended, %s", problem[0])
                yield ending(problem, last)
                return
            last = chunk
            yield chunk
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


class CredentialWatch:
    """When a stream's credential is due for a recheck, and the check itself (never fatal on its own)."""

    def __init__(self, check: CredentialCheck | None, settings: Settings, expires_at: float | None = None):
        self.check, self.period, self.expires_at = check, recheck_seconds(settings), expires_at
        self.due = time.monotonic() + self.period

    def problem(self) -> tuple[str, str] | None:
        """(reason, message) once the credential stopped being valid; checks only when due."""
        if self.check is None:
            return None
        now = time.monotonic()
        expired = self.expires_at is not None and time.time() >= self.expires_at
        if now < self.due and not expired:
            return None
        self.due = now + self.period
        try:
            return self.check()
        except Exception:  # noqa: BLE001 - the database is away: keep streaming, ask again next period
            log.warning("stream: the credential recheck failed; retrying in %.1f s", self.period, exc_info=True)
            return None

    def wait_bound(self, longest: float) -> float:
        """How long the stream may sleep before its next check is due."""
        if self.check is None:
            return longest
        until = self.due - time.monotonic()
        if self.expires_at is not None:
            until = min(until, self.expires_at - time.time())
        return max(0.05, min(longest, until))


def sse_stream(events: EventLog, session_id: str, after: int, settings: Settings, sock: Any,
               recover: Callable[[int], str] | None = None, check: CredentialCheck | None = None,
               expires_at: float | None = None,
               ring: Callable[[], AbstractContextManager[Ring]] | None = None) -> Iterator[str]:
    """The body of an SSE response: events after ``after``, then live, with heartbeats.

    Each ``yield`` returns only once the server has written the chunk, so the
    follower's position is always what the client was actually sent. It counts
    as one open ``sse`` stream (``steprun_active_streams``) from its first chunk
    until it ends: its own end, an error, or the server closing it when the
    client went away (a failed write; a heartbeat finds out within
    STEPRUN_SSE_HEARTBEAT_SECONDS).

    ``check`` is the credential's recheck (every :func:`recheck_seconds`, and at ``expires_at``): once
    it reports a problem the stream ends with ``event: error`` (code ``unauthorized``, its reason and
    the cursor to resume from with a new credential). ``ring``: where the stream's wake-up flag comes
    from, for as long as it runs (default: a plain :class:`Ring`).
    """
    with track_stream("sse"):  # open for exactly as long as this body runs, whichever way it ends
        yield from _sse_body(events, session_id, after, settings, sock, recover,
                             CredentialWatch(check, settings, expires_at), ring or _plain_ring)


@contextmanager
def _plain_ring() -> Iterator[Ring]:
    yield Ring()


def _sse_body(events: EventLog, session_id: str, after: int, settings: Settings, sock: Any,
              recover: Callable[[int], str] | None, watch: CredentialWatch,
              ring_scope: Callable[[], AbstractContextManager[Ring]]) -> Iterator[str]:
    follower = LogFollower(events, session_id, after, settings, recover)
    heartbeat = max(0.05, settings.sse_heartbeat_seconds)
    previous_timeout = bound_socket(sock, settings)
    try:
        with ring_scope() as own, follower.listening(own) as ring:
            # Reconnect quickly; the first bytes also let the client see the headers at once.
            yield "retry: 1000\n\n"
            last_write = time.monotonic()
            timed_out = False
            while True:
                ring.clear()
                problem = watch.problem()
                if problem is not None:
                    error = {"code": "unauthorized", "reason": problem[0], "message": problem[1],
                             "cursor": follower.position}
                    yield f"event: error\ndata: {json.dumps({'error': error})}\n\n"
                    return
                try:
                    frames = follower.next_frames(poll=timed_out)
                except SlowConsumer as exc:
                    yield f": slow_consumer; reconnect with Last-Event-ID: {exc.cursor}\n\n"
                    return
                except StreamEnded as exc:
                    error = {"code": exc.reason, "message": exc.message, "cursor": exc.cursor}
                    yield f"event: error\ndata: {json.dumps({'error': error})}\n\n"
                    return
                if frames:
                    yield "".join(sse_frame(f) for f in frames)
                    follower.sent(frames[-1].cursor)
                    last_write = time.monotonic()
                    continue
                idle = time.monotonic() - last_write
                if idle >= heartbeat:
                    yield ": heartbeat\n\n"
                    last_write = time.monotonic()
                    continue
                timed_out = not ring.wait(watch.wait_bound(min(heartbeat - idle, POLL_SECONDS)))
    finally:
        if sock is not None:
            try:
                sock.settimeout(previous_timeout)
            except OSError:
                pass
