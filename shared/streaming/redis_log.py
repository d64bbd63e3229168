"""The production event log: a Redis stream per session, rung through one pub/sub doorbell per process."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from shared.streaming.protocol import Appended, Batch, Fence, Fenced, Ring, is_gone, with_cursor

log = logging.getLogger(__name__)


# KEYS: stream, counter, cancel flag ('' for none), fence ('' for none), ids held, era start.
# ARGV: channel, events kept, ttl (ms), attempt, close, floor, refresh ('1': set the keys' TTL), lead (the first
# ``lead`` pairs go only ahead of the rest: skipped if the log holds an id of the rest), then (id, body) pairs
# ('' id: not deduplicated).
# Returns {last cursor (0 if nothing added; -1 refused by the fence), cancel flag, era reset}.
# Rings one channel per append: the session's ``:d`` channel when it adds a durable event, else the session's.
# One round trip appends a whole batch, atomically: a refused batch adds nothing.
# Every command inside counts (INFO commandstats): one INCRBY numbers the whole batch, one XADD adds it (as
# one entry), the fence and the cancel flag are one read, and the TTLs are set only when the caller says
# they are due (or the log is new).
# An entry holds at most this many events (a republish may append hundreds at once).
ENTRY_EVENTS = 64
_APPEND_LUA = """
local attempt = tonumber(ARGV[4])
local cancel = 0
if KEYS[4] ~= '' or KEYS[3] ~= '' then
  local read = {}
  if KEYS[4] ~= '' then read[#read + 1] = KEYS[4] end
  if KEYS[3] ~= '' then read[#read + 1] = KEYS[3] end
  local got = redis.call('MGET', unpack(read))
  if KEYS[3] ~= '' and got[#read] then cancel = 1 end
  if KEYS[4] ~= '' then
    local fence = tonumber(got[1] or '0')
    if attempt > 0 and fence > attempt then return {'-1', cancel, 0} end
    local mark = attempt
    if ARGV[5] == '1' then mark = 4503599627370496 end
    -- A turn's first attempt (1) needs no mark: there is no earlier one for it to shut out.
    if mark > fence and mark > 1 then redis.call('SET', KEYS[4], string.format('%.0f', mark), 'PX', ARGV[3]) end
  end
end
-- The bodies to add, in order: those without an id, and each id the log does not hold yet (once). One HSETNX
-- for a single id; for more, one HMGET and one HSET, whatever their number.
local lead = tonumber(ARGV[8])
local function accepted()
  local take, ids = {}, {}
  for i = 9, #ARGV, 2 do
    if ARGV[i] ~= '' then ids[#ids + 1] = ARGV[i] end
  end
  if #ids == 1 and lead == 0 then
    for i = 9, #ARGV, 2 do
      if ARGV[i] == '' or redis.call('HSETNX', KEYS[5], ARGV[i], 1) == 1 then take[#take + 1] = i end
    end
    return take
  end
  local held = {}
  if #ids > 0 then
    local got = redis.call('HMGET', KEYS[5], unpack(ids))
    for j = 1, #ids do
      if got[j] then held[ids[j]] = true end
    end
  end
  local first = 9
  for i = 9 + 2 * lead, #ARGV, 2 do
    if lead > 0 and ARGV[i] ~= '' and held[ARGV[i]] then first = 9 + 2 * lead; break end
  end
  local new = {}
  for i = first, #ARGV, 2 do
    local id = ARGV[i]
    if id == '' then
      take[#take + 1] = i
    elseif not held[id] then
      held[id] = true
      take[#take + 1] = i
      new[#new + 1] = id
      new[#new + 1] = 1
    end
  end
  if #new > 0 then redis.call('HSET', KEYS[5], unpack(new)) end
  return take
end
local take = accepted()
local floor = tonumber(ARGV[6])
local last = tonumber(redis.call('INCRBY', KEYS[2], #take))
local reset = 0
if last == #take or last - #take < floor then
  -- A new log (a live counter starts from the clock, never from 0), or one older than its writer knows
  -- (restored from a snapshot): start above the clock and the floor, and remember where, so every
  -- cursor from before reads as gone.
  local t = redis.call('TIME')
  local start = math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]), floor)
  -- Each era holds each durable event at most once: a restored snapshot's ids are of the old era.
  redis.call('DEL', KEYS[5])
  take = accepted()
  last = start + #take
  redis.call('SET', KEYS[2], string.format('%.0f', last))
  redis.call('SET', KEYS[6], string.format('%.0f', start))
  reset = 1
end
local c = last - #take
local durable = false
-- One entry per append (of at most ENTRY_EVENTS events), named by its last event's cursor; its fields e, e1,
-- e2, ... are the events in order, so the one before the entry's first is the previous entry's name.
local entry = {}
-- The ring carries the append's events too (see RING_BYTES), so a follower needs no read to take them.
local news, size = {}, 0
for n, i in ipairs(take) do
  c = c + 1
  entry[#entry + 1] = #entry == 0 and 'e' or 'e' .. (#entry / 2)
  entry[#entry + 1] = ARGV[i + 1]
  if ARGV[i] ~= '' then durable = true end
  if news then
    size = size + #ARGV[i + 1]
    if size > RING_BYTES or string.find(ARGV[i + 1], '\\n', 1, true) then news = nil else news[n] = ARGV[i + 1] end
  end
  if #entry == 2 * ENTRY_EVENTS or n == #take then
    -- Trimmed by cursor, not by entries: the log keeps its last ARGV[2] events (and what shares a stream node
    -- with them: Redis trims whole nodes).
    redis.call('XADD', KEYS[1], 'MINID', '~', string.format('%.0f', c - tonumber(ARGV[2]) + 1),
               string.format('%.0f-0', c), unpack(entry))
    entry = {}
  end
end
if reset == 1 or ARGV[7] == '1' then
  for i = 1, 6 do
    if i ~= 3 and i ~= 4 and KEYS[i] ~= '' then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
  end
end
if #take == 0 then c = 0 end
-- One ring per append: the durable doorbell (':d') for an append with a durable event (a status change), the
-- session's channel for one of deltas alone. A status waiter listens on the first; a follower, on both.
if c ~= 0 then
  local ring = string.format('%.0f', c)
  if news then ring = ring .. '\\n' .. table.concat(news, '\\n') end
  redis.call('PUBLISH', durable and (ARGV[1] .. ':d') or ARGV[1], ring)
end
return {string.format('%.0f', c), cancel, reset}
"""

# A ring's message is the append's last cursor, then (when its events add up to at most this many bytes and
# none holds a newline) a newline and each event, newline-separated: the events at the cursors up to it.
RING_BYTES = 16384
_APPEND_LUA = _APPEND_LUA.replace("ENTRY_EVENTS", str(ENTRY_EVENTS)).replace("RING_BYTES", str(RING_BYTES))


def _cursor(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


def _first(entry: tuple[bytes, dict[bytes, bytes]]) -> int:
    """The cursor of an entry's first event (an entry is named by its last)."""
    return _cursor(entry[0]) - len(entry[1]) + 1


def _events(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[tuple[int, bytes]]:
    """(cursor, body) of each event of ``entries`` (as XRANGE returns them), oldest first: an entry holds
    one append's events in order (fields e, e1, e2, ...; an entry of one event, e alone)."""
    out: list[tuple[int, bytes]] = []
    for entry in entries:
        out.extend(enumerate(entry[1].values(), _first(entry)))
    return out


class RedisEventLog:
    def __init__(self, client: Any, *, prefix: str, retention_seconds: int, max_len: int):
        self.redis = client
        self.prefix = prefix
        self.retention = retention_seconds
        self.max_len = max_len
        self._append = client.register_script(_APPEND_LUA)
        # The keys' TTL is set to retention + ``refresh_every`` at most once per ``refresh_every`` per session
        # and process (and whenever the log is new): a log still lives at least ``retention`` seconds after
        # its last append (at most ``refresh_every`` more), for four PEXPIREs per session, process and interval
        # instead of four per append.
        self.refresh_every = min(60.0, retention_seconds / 10)
        self._ttl_ms = int((retention_seconds + self.refresh_every) * 1000)
        self._refreshed: dict[str, float] = {}
        self._doorbell: Doorbell | None = None
        self._doorbell_lock = threading.Lock()

    def _keys(self, session_id: str) -> tuple[str, str, str]:
        base = f"{self.prefix}:s:{session_id}"
        return f"{base}:log", f"{base}:n", base

    def append(self, session_id: str, bodies: Iterable[str], cancel_turn_id: str | None = None) -> tuple[int, bool]:
        done = self.append_events(session_id, list(bodies), cancel_turn_id=cancel_turn_id)
        return done.last, done.cancelled

    def append_events(self, session_id: str, bodies: Sequence[str], *, ids: Sequence[str] | None = None,
                      fence: Fence | None = None, floor: int = 0,
                      cancel_turn_id: str | None = None, lead: int = 0) -> Appended:
        stream, counter, channel = self._keys(session_id)
        cancel_key = f"{self.prefix}:cancel:{cancel_turn_id}" if cancel_turn_id else ""
        fence_key = f"{self.prefix}:fence:{fence.turn_id}" if fence else ""
        pairs: list[str] = []
        for i, body in enumerate(bodies):
            pairs += [ids[i] if ids else "", body]
        now = time.monotonic()
        refresh = now - self._refreshed.get(session_id, -1e18) >= self.refresh_every
        last, cancel, reset = self._append(
            keys=[stream, counter, cancel_key, fence_key, f"{channel}:ids", f"{channel}:era"],
            args=[channel, self.max_len, self._ttl_ms, fence.attempt if fence else 0,
                  1 if fence and fence.close else 0, floor, 1 if refresh else 0, lead, *pairs],
        )
        if int(last) < 0:
            raise Fenced(f"turn {fence.turn_id if fence else '?'}: attempt {fence.attempt if fence else 0} "
                         "is fenced out of the event log")
        if refresh or reset:
            self._note_refresh(session_id, now)
        return Appended(int(last), bool(cancel), bool(reset))

    def _note_refresh(self, session_id: str, now: float) -> None:
        refreshed = self._refreshed
        if len(refreshed) >= 50_000:  # bounded: forget the sessions whose TTL is due again anyway
            for key in [k for k, at in list(refreshed.items()) if now - at >= self.refresh_every]:
                refreshed.pop(key, None)
            if len(refreshed) >= 50_000:
                refreshed.clear()
        refreshed[session_id] = now

    def read(self, session_id: str, after: int, limit: int = 500) -> Batch:
        stream, _, base = self._keys(session_id)
        # From the reader's own cursor, inclusive: the event at it, when there, proves the cursor is kept. The
        # entries from the one holding it (the first named at or after it).
        entries = [(c, body) for c, body in
                   _events(self.redis.xrange(stream, min=f"{max(after, 0)}-0", max="+", count=limit + 1))
                   if c >= after]
        if after > 0 and entries and entries[0][0] == after and entries[-1][0] == after + len(entries) - 1:
            # Kept, and the log goes on from it without a gap: cursors are numbered one by one, trimming
            # only takes the oldest, and a new era (a lost or restored log) starts above the old one's
            # cursors with a jump, so a run counting up from the cursor is this era's. One command for a
            # reader keeping up, at the head or not.
            kept = entries[1:limit + 1]
            return Batch([with_cursor(c, body.decode()) for c, body in kept], kept[-1][0] if kept else after,
                         False, after)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrevrange(stream, count=1)
        pipe.xrange(stream, min="-", max="+", count=1)
        pipe.get(f"{base}:era")
        last, first, era = pipe.execute()
        taken = [(c, body) for c, body in entries if c > after][:limit]
        events = [with_cursor(c, body.decode()) for c, body in taken]
        low = int(era or 0)
        head = _cursor(last[0][0]) if last else 0
        oldest = _first(first[0]) if first else None
        gone = is_gone(after, oldest, head, low)
        since = max(low, (oldest or 1) - 1) if oldest is not None else low
        return Batch(events, taken[-1][0] if taken else after, gone, since)

    def head(self, session_id: str) -> int:
        stream, _, _ = self._keys(session_id)
        last = self.redis.xrevrange(stream, count=1)
        return _cursor(last[0][0]) if last else 0

    def wait(self, session_id: str, after: int, timeout: float, limit: int = 500) -> Batch:
        batch = self.read(session_id, after, limit)
        if batch.events or batch.gone or timeout <= 0:
            return batch
        deadline = time.monotonic() + timeout
        # A client that waits again and again (GET …/events?wait=, a Responses stream) finds its
        # subscriptions still there: no SUBSCRIBE and UNSUBSCRIBE of both channels for each wait.
        _, _, channel = self._keys(session_id)
        with self.doorbell().listen(channel, channel + ":d", linger=WAIT_LINGER_SECONDS) as ring:
            while True:
                batch = self.read(session_id, after, limit)
                remaining = deadline - time.monotonic()
                if batch.events or batch.gone or remaining <= 0:
                    return batch
                # The poll fallback covers a doorbell lost in a reconnect.
                ring.wait(min(remaining, 1.0))
                ring.clear()

    def tail(self, session_id: str, count: int) -> list[str]:
        stream, _, _ = self._keys(session_id)
        newest = [body.decode() for entry in self.redis.xrevrange(stream, count=count)
                  for body in reversed(entry[1].values())]
        return newest[:count]

    def listen(self, session_id: str, durable: bool = False) -> _Listening:
        channel = self._keys(session_id)[2]
        if durable:
            # A status waiter (a long-poll) comes back for the session's next turn: its subscription
            # outlives it a while, so the next wait needs no SUBSCRIBE, UNSUBSCRIBE or wake-up PUBLISH.
            return self.doorbell().listen(channel + ":d", linger=DURABLE_LINGER_SECONDS)
        # Each append rings one of the two (the script's end): a follower listens on both, with one ring.
        return self.doorbell().listen(channel, channel + ":d")

    def doorbell(self) -> Doorbell:
        with self._doorbell_lock:
            if self._doorbell is None:
                self._doorbell = Doorbell(self.redis)
            return self._doorbell

    def delete(self, session_id: str) -> None:
        stream, counter, base = self._keys(session_id)
        self.redis.delete(stream, counter, f"{base}:ids", f"{base}:era")
        self._refreshed.pop(session_id, None)

    def request_cancel(self, turn_id: str) -> None:
        self.redis.set(f"{self.prefix}:cancel:{turn_id}", 1, ex=max(self.retention, 3600))

    def cancel_requested(self, turn_id: str) -> bool:
        return bool(self.redis.exists(f"{self.prefix}:cancel:{turn_id}"))

    def ping(self) -> None:
        self.redis.ping()

    def close(self) -> None:
        if self._doorbell is not None:
            self._doorbell.close()
        self.redis.close()


# How long a durable (status) channel stays subscribed after its last waiter left.
DURABLE_LINGER_SECONDS = 10.0
# How long a :meth:`RedisEventLog.wait`'s channels stay subscribed after it returned.
WAIT_LINGER_SECONDS = 2.0


class _Listening:
    def __init__(self, bell: Doorbell, channels: tuple[str, ...], linger: float = 0.0):
        self.bell, self.channels, self.ring, self.linger = bell, channels, Ring(), linger

    def __enter__(self) -> Ring:
        self.bell._add(self.channels, self.ring)
        return self.ring

    def __exit__(self, *exc: object) -> None:
        for channel in self.channels:
            self.bell._remove(channel, self.ring, self.linger)


class Doorbell:
    """One pub/sub connection per process, shared by every waiter in it.

    Channels are subscribed while someone listens. redis-py's PubSub is not
    safe to drive from two threads, so subscribe requests go through a queue to
    the one listener thread, which also wakes a channel's waiters once its
    subscription is confirmed (they then re-read the log: no gap between their
    read and the subscription).
    """

    def __init__(self, client: Any):
        self.redis = client
        self._waiters: dict[str, set[Ring]] = defaultdict(set)
        # Channels nobody waits on any more, still subscribed until the time.monotonic() given.
        self._lingering: dict[str, float] = {}
        self._lock = threading.Lock()
        self._changes: list[tuple[str, str]] = []
        self._closed = False
        # This doorbell's own channel: a message on it wakes the listener thread to subscribe at once
        # (it would otherwise see a new subscription only when its read times out).
        self._control = f"steprun-doorbell:{uuid.uuid4().hex}"
        self._armed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steprun-doorbell", daemon=True)
        self._thread.start()

    def listen(self, *channels: str, linger: float = 0.0) -> _Listening:
        """One ring for wake-ups of any of ``channels``; ``linger``: seconds each stays subscribed after its
        last listener left."""
        return _Listening(self, channels, linger)

    def _add(self, channels: tuple[str, ...], ring: Ring) -> None:
        first = False
        with self._lock:
            for channel in channels:
                # A lingering channel is still subscribed: no change to make, no wake-up to send.
                if not self._waiters[channel] and self._lingering.pop(channel, None) is None:
                    self._changes.append(("sub", channel))
                    first = True
                self._waiters[channel].add(ring)
        if first and self._armed.is_set():
            try:
                self.redis.publish(self._control, "")
            except Exception:  # noqa: BLE001 - the listener subscribes on its next read timeout anyway
                pass

    def _remove(self, channel: str, ring: Ring, linger: float = 0.0) -> None:
        with self._lock:
            waiters = self._waiters.get(channel)
            if waiters is None:
                return
            waiters.discard(ring)
            if not waiters:
                del self._waiters[channel]
                if linger > 0:
                    self._lingering[channel] = time.monotonic() + linger
                else:
                    self._changes.append(("unsub", channel))

    def _end_lingering(self) -> None:
        """Queue the unsubscription of channels whose linger ran out (with ``_lock`` held)."""
        if not self._lingering:
            return
        now = time.monotonic()
        for channel in [c for c, until in self._lingering.items() if until <= now]:
            del self._lingering[channel]
            self._changes.append(("unsub", channel))

    def _wake(self, channel: str, news: bytes | None) -> None:
        with self._lock:
            rings = list(self._waiters.get(channel, ()))
        for ring in rings:
            ring.set(news)

    def _run(self) -> None:
        while not self._closed:
            pubsub = self.redis.pubsub()
            try:
                with self._lock:
                    # After a reconnect, subscribe everything anyone still waits on (what lingered is gone).
                    self._lingering.clear()
                    self._changes = [("sub", ch) for ch in self._waiters]
                pubsub.subscribe(self._control)
                self._armed.set()
                while not self._closed:
                    with self._lock:
                        self._end_lingering()
                        changes, self._changes = self._changes, []
                    for action, channel in changes:
                        (pubsub.subscribe if action == "sub" else pubsub.unsubscribe)(channel)
                    if not pubsub.subscribed:
                        time.sleep(0.02)
                        continue
                    message = pubsub.get_message(timeout=0.25)
                    if message and message["type"] in ("message", "subscribe"):
                        channel = message["channel"]
                        name = channel.decode() if isinstance(channel, bytes) else channel
                        if name != self._control:  # the control channel only wakes this loop
                            # A subscription's confirmation wakes its waiters too (to read what came before).
                            news = message["data"] if message["type"] == "message" else None
                            self._wake(name, news if isinstance(news, bytes) else None)
            except Exception:  # noqa: BLE001 - a lost connection: back off, reconnect, re-subscribe
                self._armed.clear()
                if not self._closed:
                    log.warning("event doorbell: pub/sub connection failed; reconnecting", exc_info=True)
                time.sleep(0.5)
            finally:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001
                    pass

    def close(self) -> None:
        self._closed = True
