"""The session tail (shared/streaming/tail.py): every stream of a session in a process reads the log once per
ring, and each still gets exactly its own events after its own cursor, 410s and slow-client closes included."""
from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import redis
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import TextMessage

from api.relay import CursorGone, LogFollower, SlowConsumer
from shared.settings import Settings
from shared.streaming.memory_log import MemoryEventLog
from shared.streaming.protocol import Batch, Ring, encode_event
from shared.streaming.redis_log import RedisEventLog
from shared.streaming.tail import ws_text_frame
from tests.support.processes import REDIS_URL, RUN_ID


class CountingLog:
    """An event log that counts its reads (every other call goes to the real one)."""

    def __init__(self, log: Any):
        self._log, self.reads = log, 0

    def read(self, session_id: str, after: int, limit: int = 500) -> Batch:
        self.reads += 1
        batch: Batch = self._log.read(session_id, after, limit)
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


@pytest.fixture(params=["redis", "memory"])
def log(request: pytest.FixtureRequest) -> Iterator[CountingLog]:
    if request.param == "memory":
        yield CountingLog(MemoryEventLog(retention_seconds=3600, max_len=1000))
        return
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"steprun-tail-{RUN_ID}-{secrets.token_hex(3)}"
    events = RedisEventLog(client, prefix=prefix, retention_seconds=60, max_len=1000)
    yield CountingLog(events)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    events.close()


def _settings(**changes: Any) -> Settings:
    return Settings().replace(**{"stream_buffer": 64, "stream_slow_seconds": 5.0, "event_log_max": 1000, **changes})


def _deltas(n: int, turn: str = "t1") -> list[str]:
    return [encode_event("message.delta", turn, {"step": 0, "attempt": 1, "text": f"w{i} "}) for i in range(n)]


def _settle(rings: list[Ring], seconds: float = 0.3) -> None:
    """Let the doorbell's subscription rings land, then forget them."""
    time.sleep(seconds)
    for ring in rings:
        ring.clear()


def test_viewers_of_one_session_read_the_log_once_per_ring(log: CountingLog) -> None:
    sid = f"s-{secrets.token_hex(4)}"
    settings = _settings()
    log.append(sid, _deltas(1))
    head = log.head(sid)
    followers = [LogFollower(log, sid, head, settings) for _ in range(50)]  # type: ignore[arg-type]
    with ExitStack() as stack:
        rings = [stack.enter_context(f.listening()) for f in followers]
        assert all(f.next_frames() == [] for f in followers)  # at the head: the first one read, for all
        _settle(rings)
        for f in followers:
            assert f.next_frames() == []
        log.reads = 0

        log.append(sid, _deltas(3))  # one append, one ring
        texts = []
        for follower, ring in zip(followers, rings, strict=True):
            assert ring.wait(5), "every viewer is woken"
            ring.clear()
            frames = follower.next_frames()
            for frame in frames:
                follower.sent(frame.cursor)
            texts.append([f.text for f in frames])
            assert follower.next_frames() == []  # "nothing left" is answered from memory
        assert log.reads == 1, f"50 viewers, one ring: {log.reads} reads of the log"
        assert all(t == texts[0] for t in texts) and len(texts[0]) == 1  # 3 deltas merged once for all
        assert all(f.position == log.head(sid) for f in followers)


def test_each_viewer_gets_its_own_cursor_and_a_viewer_behind_the_tail_reads_the_log(log: CountingLog) -> None:
    sid = f"s-{secrets.token_hex(4)}"
    settings = _settings(stream_buffer=4)  # the tail holds 16 events
    log.append(sid, [encode_event("turn.queued", f"t{i}") for i in range(40)])
    head = log.head(sid)
    live = LogFollower(log, sid, head, settings)  # type: ignore[arg-type]
    behind = LogFollower(log, sid, head - 30, settings)  # type: ignore[arg-type]
    with live.listening(), behind.listening():
        assert live.next_frames() == []
        got = []
        while frames := behind.next_frames():
            got += [f.cursor for f in frames]
            behind.sent(frames[-1].cursor)
        assert got == list(range(head - 29, head + 1))  # each once, in order, none skipped
        assert live.tail is behind.tail and live.tail is not None and live.tail.own_reads >= 2


def test_viewers_of_other_sessions_never_see_each_others_events(log: CountingLog) -> None:
    a, b = f"s-{secrets.token_hex(4)}", f"s-{secrets.token_hex(4)}"
    settings = _settings()
    fa, fb = LogFollower(log, a, 0, settings), LogFollower(log, b, 0, settings)  # type: ignore[arg-type]
    with fa.listening(), fb.listening():
        log.append(a, [encode_event("turn.queued", "ta")])
        log.append(b, [encode_event("turn.queued", "tb")])
        assert ['"turn_id":"ta"' in f.text for f in fa.next_frames()] == [True]
        assert ['"turn_id":"tb"' in f.text for f in fb.next_frames()] == [True]
        assert fa.tail is not fb.tail


def test_a_log_lost_under_the_tail_is_410_for_its_viewers(log: CountingLog) -> None:
    sid = f"s-{secrets.token_hex(4)}"
    settings = _settings()
    log.append(sid, _deltas(2))
    head = log.head(sid)
    followers = [LogFollower(log, sid, head, settings) for _ in range(3)]  # type: ignore[arg-type]
    with ExitStack() as stack:
        rings = [stack.enter_context(f.listening()) for f in followers]
        assert all(f.next_frames() == [] for f in followers)
        _settle(rings)
        log.delete(sid)  # Redis lost the log; the next append starts a new era above every old cursor
        log.append(sid, _deltas(1))
        for f, ring in zip(followers, rings, strict=True):
            assert ring.wait(5)
            with pytest.raises(CursorGone):
                f.next_frames()


def test_a_viewer_a_full_buffer_behind_for_too_long_is_a_slow_consumer(log: CountingLog) -> None:
    sid = f"s-{secrets.token_hex(4)}"
    log.append(sid, _deltas(2))
    live = LogFollower(log, sid, log.head(sid), _settings(stream_buffer=4))  # type: ignore[arg-type]
    with live.listening():
        assert live.next_frames() == []
        slow = LogFollower(log, sid, log.head(sid), _settings(stream_buffer=4, stream_slow_seconds=0.0))  # type: ignore[arg-type]
        with slow.listening():
            log.append(sid, [encode_event("turn.queued", f"t{i}") for i in range(10)])
            assert len(live.next_frames(poll=True)) == 4  # the tail reads; a full batch, from memory
            time.sleep(0.01)
            with pytest.raises(SlowConsumer):
                slow.next_frames()  # a full batch too, and it has not caught up for longer than 0 s


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_a_frame_encoded_once_is_what_the_websocket_library_would_send(size: int) -> None:
    server = Connection(ConnectionType.SERVER)  # an open connection, past the handshake
    text = "é" * (size // 2) + "x" * (size % 2)
    assert ws_text_frame(text) == server.send(TextMessage(data=text))
