"""One tail per session per process: the log is read once per doorbell ring, whatever the number of viewers.

Every stream of a session in this process (WebSockets, SSE) follows the same
:class:`SessionTail`. The tail holds one doorbell subscription for the session
and the session's most recent events in memory, as frames parsed once. When the
doorbell rings, the first viewer to look reads the log after the tail's head
(one read, under the tail's lock; the other viewers wait for it) and every
viewer then takes its frames from memory, each from its own cursor. A ring that
carries its append's events (the Redis log's do, when they are small) needs no
read at all when they follow the tail's head: the append wrote them to the log
and rang with them in one step, so they are the log's events at those cursors;
a ring whose events do not follow the head (one was lost) is read as any other.
A viewer whose cursor is outside what the tail holds (behind it after a
reconnect or a backfill, or ahead of it) reads the log itself, exactly as if
there were no tail, so cursor and 410 semantics are those of the log: the tail
only serves events it read from the log (or its appends rang with), in the
log's order, after the viewer's cursor, and it never holds more than the log
keeps (its capacity is below the log's length), so what it serves the log still
had. A read of the tail that finds its head gone (the log expired, was lost or
restored) empties it; each viewer then reads the log itself and sees the same
``gone`` it would have seen alone.

Frames carry their WebSocket encoding, built on first use and shared by every
socket that sends them (server frames are not masked: the bytes are the same
for every client), and runs of deltas are merged once per cursor range for all
lagging viewers at the same position.
"""
from __future__ import annotations

import bisect
import json
import struct
import threading
import time
import weakref
from collections import deque
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from shared.streaming.protocol import EventLog, Ring, with_cursor

# The memo of merged runs keeps this many (cursor range -> frames) entries per tail.
_MERGED_KEPT = 8
# A tail keeps at most this many rings' news that no viewer has looked at yet; past it, the next look reads.
_NEWS_KEPT = 64


@dataclass(eq=False)
class Frame:
    """One event as sent: its cursor, its type and its JSON text (as stored, unless coalesced)."""

    cursor: int
    type: str
    text: str
    _wire: bytes | None = field(default=None, repr=False)
    _event: dict[str, Any] | None = field(default=None, repr=False)

    def wire(self) -> bytes:
        """The frame as a WebSocket text frame on the wire (server to client: FIN, unmasked), built once."""
        if self._wire is None:
            self._wire = ws_text_frame(self.text)
        return self._wire

    def event(self) -> dict[str, Any]:
        """The event decoded (once; shared, so never modify it)."""
        if self._event is None:
            self._event = json.loads(self.text)
        return self._event


def ws_text_frame(text: str) -> bytes:
    """``text`` as one final, unmasked WebSocket text frame (RFC 6455 section 5.2)."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x81, 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 127, n)
    return head + payload


def parse_frame(text: str) -> Frame:
    """Cursor and type of a stored event without decoding it (the log writes them first)."""
    if text.startswith('{"cursor":'):
        comma = text.find(",", 10)
        if comma > 0 and text.startswith('"type":"', comma + 1):
            end = text.find('"', comma + 9)
            if end > 0:
                return Frame(int(text[10:comma]), text[comma + 9:end], text)
    event = json.loads(text)
    return Frame(int(event["cursor"]), str(event["type"]), text)


def _delta_key(event: dict[str, Any]) -> tuple[Any, ...]:
    data = event.get("data") or {}
    return event.get("turn_id"), data.get("step"), data.get("attempt")


def coalesce(frames: list[Frame]) -> list[Frame]:
    """Merge runs of message.delta frames of the same turn, step and attempt into one.

    The merged frame carries the last cursor of its run, so a client resuming
    from it neither misses nor repeats text. Deltas of different attempts are
    never merged: a client must be able to drop an earlier attempt's text.
    """
    out: list[Frame] = []
    run: list[Frame] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            last = run[-1].event()
            merged = dict(last, data=dict(last.get("data") or {},
                                          text="".join(f.event()["data"]["text"] for f in run)))
            out.append(Frame(run[-1].cursor, "message.delta", json.dumps(merged, separators=(",", ":"))))
        run.clear()

    for frame in frames:
        if frame.type != "message.delta":
            flush()
            out.append(frame)
            continue
        if run and _delta_key(run[-1].event()) != _delta_key(frame.event()):
            flush()
        run.append(frame)
    flush()
    return out


class SessionTail:
    """The recent events of one session, read once per ring for every viewer of it in this process."""

    __slots__ = ("events", "session_id", "capacity", "read_limit", "viewers", "base", "head", "frames",
                 "_cursors", "dirty", "rings", "read_at", "reads", "own_reads", "taken", "news", "_lock",
                 "_merged", "bell")

    def __init__(self, events: EventLog, session_id: str, *, capacity: int, read_limit: int):
        self.events, self.session_id = events, session_id
        self.capacity, self.read_limit = max(1, capacity), max(1, read_limit)
        self.viewers: set[Ring] = set()
        # The buffer: every event in (base, head] of the log, in order, as frames; head None: empty.
        self.base = 0
        self.head: int | None = None
        self.frames: list[Frame] = []
        self._cursors: list[int] = []
        # Set by each ring (and ``rings`` counted), cleared by the read that follows it.
        self.dirty = True
        self.rings = 0
        self.read_at = 0.0
        # Reads of the log: for the tail (one per ring, whatever the number of viewers), and by viewers
        # outside the buffer (their own cursor behind or ahead of it).
        self.reads = 0
        self.own_reads = 0
        # Rings whose news (the append's events) the tail took instead of reading, and the news not yet
        # looked at (appended by the doorbell, taken by the next viewer to look, under the lock).
        self.taken = 0
        self.news: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._merged: dict[tuple[int, int], list[Frame]] = {}
        # The doorbell subscription (the log's ``listen``), entered while the tail has viewers.
        self.bell: AbstractContextManager[Ring] | None = None

    def rang(self, news: bytes | None = None) -> None:
        """The doorbell rang: the log may have more; wake every viewer (the first to look reads it, or
        takes the ring's own events, ``news``, when it carries them)."""
        if news is not None and b"\n" in news and len(self.news) < _NEWS_KEPT:
            self.news.append(news)
        else:
            self.dirty = True  # read the log (news past the bound too: no viewer has looked for a while)
        self.rings += 1
        for ring in list(self.viewers):
            ring.set()

    def take(self, after: int, limit: int, stale_after: float | None = None) -> tuple[list[Frame], bool]:
        """Up to ``limit`` frames after ``after``, and whether the log says ``after`` is gone.

        From memory when ``after`` is inside the buffer, reading the log first (once for every viewer)
        if the doorbell rang since the last read, or if that read is older than ``stale_after`` seconds
        (a ring may have been lost); else by reading the log after ``after``, as a lone stream would.
        Raises what the log's read raises.
        """
        served = self._from_buffer(after, limit, stale_after)
        if served is not None:
            return served, False
        rings = self.rings
        batch = self.events.read(self.session_id, after, limit)
        if batch.gone:
            return [], True
        frames = [parse_frame(text) for text in batch.events]
        with self._lock:
            self.own_reads += 1
            if self.head is None:  # an empty tail starts from what this viewer read
                self.base, self.head, self.frames, self._cursors = after, after, [], []
                self.read_at = time.monotonic()
                self._extend(frames, batch.next)
                # A ring during the read, or a full read, leaves more to read.
                self.dirty = self.rings != rings or len(frames) >= limit
        return frames, False

    def _from_buffer(self, after: int, limit: int, stale_after: float | None) -> list[Frame] | None:
        with self._lock:
            if self.head is None or not self.base <= after <= self.head:
                return None
            if self.news:
                self._take_news()
            if stale_after is not None and time.monotonic() - self.read_at >= stale_after:
                self.dirty = True
            while self.dirty and self.head is not None:
                if len(self._cursors) - bisect.bisect_right(self._cursors, after) >= limit:
                    break  # this viewer has a full batch already; the next one to look reads on
                self.dirty = False
                try:
                    batch = self.events.read(self.session_id, self.head, self.read_limit)
                except BaseException:
                    self.dirty = True
                    raise
                self.reads += 1
                self.read_at = time.monotonic()
                if batch.gone:  # expired, lost or restored: every viewer reads the log itself again
                    self.head, self.frames, self._cursors = None, [], []
                    self._merged.clear()
                    return None
                self._extend([parse_frame(text) for text in batch.events], batch.next)
                if len(batch.events) >= self.read_limit:
                    self.dirty = True  # a full read: there may be more
            if self.head is None or not self.base <= after <= self.head:
                return None
            start = bisect.bisect_right(self._cursors, after)
            return self.frames[start:start + limit]

    def _take_news(self) -> None:
        """Extend the buffer with the events the rings carried, while they follow its head (with ``_lock``
        held); a ring whose events do not (a ring lost before it, a new era) leaves the tail to read."""
        while self.news:
            head, *bodies = self.news.popleft().decode().split("\n")
            if self.dirty or self.head is None:
                continue  # the read to come takes these too
            last = int(head)
            first = last - len(bodies) + 1
            if last <= self.head:
                continue  # read already
            if first > self.head + 1:
                self.dirty = True
                continue
            self.taken += 1
            self.read_at = time.monotonic()
            self._extend([parse_frame(with_cursor(c, body)) for c, body in enumerate(bodies, first)
                          if c > self.head], last)

    def merged(self, frames: list[Frame]) -> list[Frame]:
        """``coalesce(frames)`` of frames this tail served, once per cursor range for every viewer."""
        key = (frames[0].cursor, frames[-1].cursor)
        with self._lock:
            done = self._merged.get(key)
        if done is None:
            done = coalesce(frames)
            with self._lock:
                if len(self._merged) >= _MERGED_KEPT:
                    self._merged.pop(next(iter(self._merged)))
                self._merged[key] = done
        return done

    def _extend(self, frames: list[Frame], head: int) -> None:
        for frame in frames:
            if frame.cursor > (self.head or 0):
                self.frames.append(frame)
                self._cursors.append(frame.cursor)
        self.head = max(self.head or 0, head)
        over = len(self.frames) - self.capacity
        if over > 0:
            self.base = self._cursors[over - 1]
            del self.frames[:over], self._cursors[:over]


class SessionTails:
    """Every :class:`SessionTail` of one event log in this process, each alive while a viewer follows it."""

    def __init__(self, events: EventLog, *, capacity: int, read_limit: int):
        self.events, self.capacity, self.read_limit = events, capacity, read_limit
        self._tails: dict[str, SessionTail] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str) -> SessionTail | None:
        with self._lock:
            return self._tails.get(session_id)

    def join(self, session_id: str, ring: Ring) -> SessionTail:
        """Follow the session's tail: ``ring`` is set whenever the log may have more, until :meth:`leave`."""
        with self._lock:
            tail = self._tails.get(session_id)
            if tail is not None:
                tail.viewers.add(ring)
                return tail
            tail = SessionTail(self.events, session_id, capacity=self.capacity, read_limit=self.read_limit)
            tail.viewers.add(ring)
            self._tails[session_id] = tail
            # Subscribed under the lock, so that a tail's last viewer leaving never races its first joining.
            try:
                bell = self.events.listen(session_id)
                bell.__enter__().on_set = tail.rang
            except BaseException:
                del self._tails[session_id]
                raise
            tail.bell = bell
            return tail

    def leave(self, session_id: str, tail: SessionTail, ring: Ring) -> None:
        with self._lock:
            tail.viewers.discard(ring)
            if tail.viewers or self._tails.get(session_id) is not tail:
                return
            del self._tails[session_id]
            bell, tail.bell = tail.bell, None
            if bell is not None:
                bell.__exit__(None, None, None)


_REGISTRY: weakref.WeakKeyDictionary[Any, SessionTails] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def tails_of(events: EventLog, *, capacity: int, read_limit: int) -> SessionTails:
    """This process's tails of ``events`` (one registry per event log object)."""
    with _REGISTRY_LOCK:
        tails = _REGISTRY.get(events)
        if tails is None:
            tails = _REGISTRY[events] = SessionTails(events, capacity=capacity, read_limit=read_limit)
        return tails

