"""The production event log: a Redis stream per session, rung through one pub/sub doorbell per process."""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from shared.streaming.protocol import Batch, Ring, with_cursor

log = logging.getLogger(__name__)


# KEYS: stream, counter, cancel flag. ARGV: channel, maxlen, ttl, bodies...
# Returns {last cursor, cancel flag}. One round trip appends a whole batch.
_APPEND_LUA = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2])))
end
local c = 0
for i = 4, #ARGV do
  c = redis.call('INCR', KEYS[2])
  local body = ARGV[i]
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], string.format('%.0f-0', c), 'e', body)
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if c ~= 0 then redis.call('PUBLISH', ARGV[1], string.format('%.0f', c)) end
local cancel = 0
if KEYS[3] ~= '' then cancel = redis.call('EXISTS', KEYS[3]) end
return {string.format('%.0f', c), cancel}
"""


class RedisEventLog:
    def __init__(self, client: Any, *, prefix: str, retention_seconds: int, max_len: int):
        self.redis = client
        self.prefix = prefix
        self.retention = retention_seconds
        self.max_len = max_len
        self._append = client.register_script(_APPEND_LUA)
        self._doorbell: Doorbell | None = None
        self._doorbell_lock = threading.Lock()

    def _keys(self, session_id: str) -> tuple[str, str, str]:
        base = f"{self.prefix}:s:{session_id}"
        return f"{base}:log", f"{base}:n", base

    def append(self, session_id: str, bodies: Iterable[str], cancel_turn_id: str | None = None) -> tuple[int, bool]:
        stream, counter, channel = self._keys(session_id)
        cancel_key = f"{self.prefix}:cancel:{cancel_turn_id}" if cancel_turn_id else ""
        last, cancel = self._append(
            keys=[stream, counter, cancel_key],
            args=[channel, self.max_len, self.retention, *bodies],
        )
        return int(last), bool(cancel)

    def read(self, session_id: str, after: int, limit: int = 500) -> Batch:
        stream, _, _ = self._keys(session_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrange(stream, min=f"{after + 1}-0", max="+", count=limit)
        pipe.xrange(stream, min="-", max="+", count=1)
        entries, first = pipe.execute()
        events = [with_cursor(int(eid.split(b"-")[0]), fields[b"e"].decode()) for eid, fields in entries]
        # A cursor from before the oldest entry kept (trimmed, expired, or a log
        # Redis lost) means the client missed events it can no longer get here.
        gone = after > 0 and (not first or after < int(first[0][0].split(b"-")[0]) - 1)
        next_cursor = int(entries[-1][0].split(b"-")[0]) if entries else after
        return Batch(events, next_cursor, gone)

    def head(self, session_id: str) -> int:
        stream, _, _ = self._keys(session_id)
        last = self.redis.xrevrange(stream, count=1)
        return int(last[0][0].split(b"-")[0]) if last else 0

    def wait(self, session_id: str, after: int, timeout: float, limit: int = 500) -> Batch:
        batch = self.read(session_id, after, limit)
        if batch.events or batch.gone or timeout <= 0:
            return batch
        _, _, channel = self._keys(session_id)
        doorbell = self.doorbell()
        deadline = time.monotonic() + timeout
        with doorbell.listen(channel) as ring:
            while True:
                batch = self.read(session_id, after, limit)
                remaining = deadline - time.monotonic()
                if batch.events or batch.gone or remaining <= 0:
                    return batch
                # The poll fallback covers a doorbell lost in a reconnect.
                ring.wait(min(remaining, 1.0))
                ring.clear()

    def listen(self, session_id: str) -> _Listening:
        return self.doorbell().listen(self._keys(session_id)[2])

    def doorbell(self) -> Doorbell:
        with self._doorbell_lock:
            if self._doorbell is None:
                self._doorbell = Doorbell(self.redis)
            return self._doorbell

    def delete(self, session_id: str) -> None:
        stream, counter, _ = self._keys(session_id)
        self.redis.delete(stream, counter)

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


class _Listening:
    def __init__(self, bell: Doorbell, channel: str):
        self.bell, self.channel, self.ring = bell, channel, Ring()

    def __enter__(self) -> Ring:
        self.bell._add(self.channel, self.ring)
        return self.ring

    def __exit__(self, *exc: object) -> None:
        self.bell._remove(self.channel, self.ring)


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
        self._lock = threading.Lock()
        self._changes: list[tuple[str, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="steprun-doorbell", daemon=True)
        self._thread.start()

    def listen(self, channel: str) -> _Listening:
        return _Listening(self, channel)

    def _add(self, channel: str, ring: Ring) -> None:
        with self._lock:
            first = not self._waiters[channel]
            self._waiters[channel].add(ring)
            if first:
                self._changes.append(("sub", channel))

    def _remove(self, channel: str, ring: Ring) -> None:
        with self._lock:
            waiters = self._waiters.get(channel)
            if waiters is None:
                return
            waiters.discard(ring)
            if not waiters:
                del self._waiters[channel]
                self._changes.append(("unsub", channel))

    def _wake(self, channel: str) -> None:
        with self._lock:
            rings = list(self._waiters.get(channel, ()))
        for ring in rings:
            ring.set()

    def _run(self) -> None:
        while not self._closed:
            pubsub = self.redis.pubsub()
            try:
                with self._lock:
                    # After a reconnect, subscribe everything anyone still waits on.
                    self._changes = [("sub", ch) for ch in self._waiters]
                while not self._closed:
                    with self._lock:
                        changes, self._changes = self._changes, []
                    for action, channel in changes:
                        (pubsub.subscribe if action == "sub" else pubsub.unsubscribe)(channel)
                    if not pubsub.subscribed:
                        time.sleep(0.02)
                        continue
                    message = pubsub.get_message(timeout=0.05)
                    if message and message["type"] in ("message", "subscribe"):
                        channel = message["channel"]
                        self._wake(channel.decode() if isinstance(channel, bytes) else channel)
            except Exception:  # noqa: BLE001 - a lost connection: back off, reconnect, re-subscribe
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
