"""The session tail (shared/streaming/tail.py): every stream of a session in a process reads the log once per
ring, and each still gets exactly its own events after its own cursor, 410s and slow-client closes included."""
from __future__ import annotations

import random
import secrets
import threading
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
    yield from _redis_log()


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
        # On Redis the ring carries the append's events, which follow the tail's head: no read at all.
        carried = isinstance(log._log, RedisEventLog)
        assert log.reads == (0 if carried else 1), f"50 viewers, one ring: {log.reads} reads of the log"
        assert followers[0].tail is not None and followers[0].tail.taken == (1 if carried else 0)
        assert all(t == texts[0] for t in texts) and len(texts[0]) == 1  # 3 deltas merged once for all
        assert all(f.position == log.head(sid) for f in followers)


def _redis_log() -> Iterator[CountingLog]:
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"steprun-tail-{RUN_ID}-{secrets.token_hex(3)}"
    events = RedisEventLog(client, prefix=prefix, retention_seconds=60, max_len=1000)
    yield CountingLog(events)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    events.close()


redis_log = pytest.fixture(_redis_log)


def _followed(log: CountingLog, sid: str) -> tuple[LogFollower, Ring, ExitStack]:
    follower = LogFollower(log, sid, log.head(sid), _settings())  # type: ignore[arg-type]
    stack = ExitStack()
    ring = stack.enter_context(follower.listening())
    assert follower.next_frames() == []
    _settle([ring])
    assert follower.next_frames() == []  # the subscriptions' own rings read once: the tail is clean
    return follower, ring, stack


def test_a_ring_whose_events_do_not_follow_the_tail_makes_it_read_the_log(redis_log: CountingLog) -> None:
    """A ring lost (a reconnect of the doorbell) and the next one's events carried: they do not follow the
    tail's head, so the tail reads the log from its head, and the viewer gets both appends, in order."""
    sid = f"s-{secrets.token_hex(4)}"
    redis_log.append(sid, _deltas(1))
    follower, ring, stack = _followed(redis_log, sid)
    with stack:
        tail = follower.tail
        assert tail is not None
        bell = tail.bell.ring  # type: ignore[union-attr]  # the Redis log's listening: the doorbell's ring
        lost: list[bytes | None] = []
        bell.on_set = lambda news=None: lost.append(news) if not lost else tail.rang(news)
        redis_log.reads = 0
        redis_log.append(sid, [encode_event("turn.queued", "t-a")])  # its ring is lost
        redis_log.append(sid, [encode_event("turn.queued", "t-b")])
        assert ring.wait(5)
        frames = follower.next_frames()
        assert [('"turn_id":"t-a"' in f.text, '"turn_id":"t-b"' in f.text) for f in frames] == [
            (True, False), (False, True)]
        assert [f.cursor for f in frames] == [redis_log.head(sid) - 1, redis_log.head(sid)]
        assert redis_log.reads == 1 and tail.taken == 0, "the second ring's events alone would skip one"
        assert lost and lost[0] is not None and lost[0].count(b"\n") == 1  # the lost ring carried its event


def test_an_append_too_large_to_ride_its_ring_is_read(redis_log: CountingLog) -> None:
    from shared.streaming.redis_log import RING_BYTES

    sid = f"s-{secrets.token_hex(4)}"
    redis_log.append(sid, _deltas(1))
    follower, ring, stack = _followed(redis_log, sid)
    with stack:
        redis_log.reads = 0
        big = encode_event("message.completed", "t1", {"text": "x" * RING_BYTES})
        redis_log.append(sid, [big])
        assert ring.wait(5)
        frames = follower.next_frames()
        assert [f.cursor for f in frames] == [redis_log.head(sid)]
        assert frames[0].event()["data"]["text"] == "x" * RING_BYTES
        assert redis_log.reads == 1 and follower.tail is not None and follower.tail.taken == 0


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
    with live.listening() as ring:
        assert live.next_frames() == []
        _settle([ring])  # the doorbell is subscribed before the append, so its ring cannot be lost
        slow = LogFollower(log, sid, log.head(sid), _settings(stream_buffer=4, stream_slow_seconds=0.0))  # type: ignore[arg-type]
        with slow.listening():
            log.append(sid, [encode_event("turn.queued", f"t{i}") for i in range(10)])
            assert ring.wait(5), "the append rings the tail"  # on Redis, from the doorbell's thread
            assert len(live.next_frames()) == 4  # the tail reads; a full batch, from memory
            time.sleep(0.01)
            with pytest.raises(SlowConsumer):
                slow.next_frames()  # a full batch too, and it has not caught up for longer than 0 s


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_a_frame_encoded_once_is_what_the_websocket_library_would_send(size: int) -> None:
    server = Connection(ConnectionType.SERVER)  # an open connection, past the handshake
    text = "é" * (size // 2) + "x" * (size % 2)
    assert ws_text_frame(text) == server.send(TextMessage(data=text))


def test_under_contention_every_viewer_gets_every_event_once_in_order(log: CountingLog) -> None:
    """Many viewers of a few sessions, on threads (preempted anywhere, unlike greenlets), while writers
    append deltas in random batches: each viewer, looping as the relay does (clear the ring, take, send,
    wait), ends with every event of its session exactly once and in order, its text whole, and never had
    to find an event by polling (a ring woke it for each)."""
    sessions = [f"s-{secrets.token_hex(4)}" for _ in range(4)]
    viewers_per_session, deltas_per_session = 12, 400
    settings = _settings(stream_buffer=8, stream_slow_seconds=60.0)  # a small batch: viewers lag and merge
    for sid in sessions:
        log.append(sid, [encode_event("turn.queued", "t1")])
    heads = {sid: log.head(sid) for sid in sessions}
    got: dict[tuple[str, int], list[tuple[int, str, str]]] = {}
    failures: list[BaseException] = []
    late: list[str] = []  # events a viewer found only by polling after a wait no ring ended
    stop = time.monotonic() + 60

    def view(sid: str, n: int) -> None:
        follower = LogFollower(log, sid, heads[sid], settings)  # type: ignore[arg-type]
        seen = got[(sid, n)] = []
        try:
            with follower.listening() as ring:
                timed_out = False
                while time.monotonic() < stop:
                    ring.clear()
                    frames = follower.next_frames(poll=timed_out)
                    if frames and timed_out:
                        late.append(f"{sid} viewer {n} at {follower.position}")
                    for frame in frames:
                        event = frame.event()
                        seen.append((frame.cursor, frame.type, (event.get("data") or {}).get("text", "")))
                        follower.sent(frame.cursor)
                    if seen and seen[-1][1] == "turn.completed":
                        return
                    if frames:
                        if random.random() < 0.3:
                            time.sleep(random.random() * 0.003)  # a slow socket now and then
                        continue
                    timed_out = not ring.wait(2.0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    def write(sid: str) -> None:
        try:
            i = 0
            while i < deltas_per_session:
                k = random.choice((1, 1, 2, 3, 8))
                log.append(sid, [encode_event("message.delta", "t1", {"step": 0, "attempt": 1, "text": f"w{j} "})
                                 for j in range(i, min(i + k, deltas_per_session))])
                i += k
                if random.random() < 0.5:
                    time.sleep(random.random() * 0.002)
            log.append(sid, [encode_event("turn.completed", "t1")])
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=view, args=(sid, n), daemon=True)
               for sid in sessions for n in range(viewers_per_session)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # every viewer subscribed (the doorbell's rings after subscribing landed)
    writers = [threading.Thread(target=write, args=(sid,), daemon=True) for sid in sessions]
    for t in writers:
        t.start()
    for t in writers + threads:
        t.join(timeout=max(0.1, stop - time.monotonic()))
    assert not failures, failures
    assert not late, f"woken by no ring: {late[:5]}"
    expected_text = "".join(f"w{j} " for j in range(deltas_per_session))
    for (sid, n), seen in got.items():
        cursors = [c for c, _, _ in seen]
        assert cursors == sorted(set(cursors)), f"{sid} viewer {n}: a cursor repeated or out of order"
        assert seen and seen[-1][1] == "turn.completed", f"{sid} viewer {n}: never saw the end ({len(seen)} frames)"
        assert cursors[-1] == log.head(sid)
        text = "".join(t for _, kind, t in seen if kind == "message.delta")
        assert text == expected_text, f"{sid} viewer {n}: text differs at {_first_difference(text, expected_text)}"


def _first_difference(a: str, b: str) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"char {i}: got {a[max(0, i - 20):i + 20]!r}, expected {b[max(0, i - 20):i + 20]!r}"
