"""The per-session event log: RedisEventLog (production) and MemoryEventLog (embedded) keep the same promises.

See shared/streaming/protocol.py: cursors strictly increasing per session and
starting from the clock; events stored as JSON without their cursor, which is
spliced in on the way out; ``gone`` when a client's cursor is older than what
the log still keeps; ``wait`` and ``listen`` wake on an append.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared.streaming.memory_log import MemoryEventLog
from shared.streaming.protocol import EventLog, Fence, Fenced, encode_event, with_cursor
from shared.streaming.redis_log import RedisEventLog

MakeLog = Callable[..., EventLog]


@pytest.fixture(params=["redis", "memory"])
def make_log(request: pytest.FixtureRequest) -> Iterator[MakeLog]:
    """Makes logs of one implementation: ``make_log(max_len=..., retention_seconds=...)``."""
    made: list[EventLog] = []
    if request.param == "redis":  # set up before this fixture, so torn down after it
        client = request.getfixturevalue("redis_client")
        prefix = request.getfixturevalue("unique_name")

    def make(*, max_len: int = 10_000, retention_seconds: int = 3600) -> EventLog:
        log: EventLog
        if request.param == "redis":
            log = RedisEventLog(client, prefix=prefix, retention_seconds=retention_seconds, max_len=max_len)
        else:
            log = MemoryEventLog(retention_seconds=retention_seconds, max_len=max_len)
        made.append(log)
        return log

    yield make
    for log in made:
        if isinstance(log, RedisEventLog) and log._doorbell is not None:
            log._doorbell.close()  # the client itself is the fixture's (it deletes the keys with it)


@pytest.fixture
def log(make_log: MakeLog) -> EventLog:
    return make_log()


def _session() -> str:
    return f"sess_{secrets.token_hex(6)}"


def _body(i: int, turn_id: str = "turn_1") -> str:
    return encode_event("message.delta", turn_id, {"text": f"piece {i}", "i": i})


def _cursors(events: list[str]) -> list[int]:
    return [json.loads(e)["cursor"] for e in events]


def _append_one_by_one(log: EventLog, session_id: str, bodies: list[str]) -> list[int]:
    return [log.append(session_id, [b])[0] for b in bodies]


# --- cursors -------------------------------------------------------------------------

def test_cursors_start_from_the_clock_and_strictly_increase(log: EventLog) -> None:
    sid = _session()
    before = int(time.time() * 1_000_000)
    first, _ = log.append(sid, [_body(0)])
    after = int(time.time() * 1_000_000)
    # The counter starts from the clock in microseconds: above any cursor of a log that was lost.
    assert before < first <= after + 1_000_000
    batch_last, _ = log.append(sid, [_body(1), _body(2), _body(3)])
    last, _ = log.append(sid, [_body(4)])
    cursors = _cursors(log.read(sid, 0).events)
    assert len(cursors) == 5
    assert all(a < b for a, b in zip(cursors, cursors[1:], strict=False)), cursors
    # append returns the cursor of the last event it wrote.
    assert cursors[0] == first and cursors[3] == batch_last and cursors[4] == last
    assert log.head(sid) == last


def test_each_session_has_its_own_log(log: EventLog) -> None:
    a, b = _session(), _session()
    ca = _append_one_by_one(log, a, [_body(0, "turn_a"), _body(1, "turn_a")])
    cb = _append_one_by_one(log, b, [_body(0, "turn_b")])
    assert _cursors(log.read(a, 0).events) == ca
    assert [json.loads(e)["turn_id"] for e in log.read(b, 0).events] == ["turn_b"]
    assert log.head(a) == ca[-1] and log.head(b) == cb[-1]
    assert log.head(_session()) == 0  # a session that never had an event


# --- read ------------------------------------------------------------------------------

def test_read_returns_exactly_the_later_events_in_order_with_their_cursors(log: EventLog) -> None:
    sid = _session()
    bodies = [_body(i) for i in range(6)]
    cursors = _append_one_by_one(log, sid, bodies)

    everything = log.read(sid, 0)
    # The stored text with the cursor spliced in front, byte for byte (relaying never re-encodes).
    assert everything.events == [with_cursor(c, b) for c, b in zip(cursors, bodies, strict=True)]
    for c, raw, body in zip(cursors, everything.events, bodies, strict=True):
        assert raw.startswith(f'{{"cursor":{c},')
        assert json.loads(raw) == {"cursor": c, **json.loads(body)}
    assert everything.next == cursors[-1] and everything.gone is False

    later = log.read(sid, cursors[2])
    assert _cursors(later.events) == cursors[3:]
    assert later.next == cursors[-1] and later.gone is False


def test_read_pages_with_limit_and_next(log: EventLog) -> None:
    sid = _session()
    cursors = _append_one_by_one(log, sid, [_body(i) for i in range(7)])
    seen: list[int] = []
    after = 0
    pages = 0
    while True:
        batch = log.read(sid, after, limit=3)
        if not batch.events:
            break
        assert len(batch.events) <= 3
        page = _cursors(batch.events)
        assert batch.next == page[-1]
        seen += page
        after = batch.next
        pages += 1
    assert seen == cursors and pages == 3


def test_appends_of_many_events_read_alike_from_any_cursor(log: EventLog) -> None:
    """An append of several events (the Redis log keeps it as one stream entry, of 64 events at most): read
    from any cursor, inside an append or at its end, in pages, or from the tail, the events are the same."""
    sid = _session()
    sizes = [3, 1, 2, 130, 1, 5]
    bodies = [_body(i) for i in range(sum(sizes))]
    cursors: list[int] = []
    for n in sizes:
        first = len(cursors)
        last, _ = log.append(sid, bodies[first:first + n])
        cursors += list(range(last - n + 1, last + 1))
    assert cursors == sorted(set(cursors)) and log.head(sid) == cursors[-1]
    assert _cursors(log.read(sid, 0, limit=1000).events) == cursors
    for i, after in enumerate(cursors):
        batch = log.read(sid, after, limit=1000)
        assert batch.gone is False and _cursors(batch.events) == cursors[i + 1:], after
        assert [json.loads(e)["data"]["i"] for e in batch.events] == list(range(i + 1, len(cursors)))
        page = log.read(sid, after, limit=4)
        assert _cursors(page.events) == cursors[i + 1:i + 5] and page.next == (cursors[i + 1:i + 5] or [after])[-1]
    for count in (1, 2, 3, 64, 65, 200):
        assert log.tail(sid, count) == list(reversed(bodies))[:count], count


def test_a_lead_goes_only_ahead_of_events_the_log_does_not_hold_yet(log: EventLog) -> None:
    """A committed step's last deltas ride its commit's append as a lead: if the republish sweep appended the
    commit's events first, the lead is left out (it would land after them), and the rest is skipped by id."""
    sid = _session()
    done = _body(1, "turn_a").replace("message.delta", "turn.completed")
    first = log.append_events(sid, [_body(10, "turn_a"), done], ids=["", "ev_a"], lead=1)
    assert [json.loads(e)["cursor"] for e in log.read(sid, 0).events] == [first.last - 1, first.last]
    swept = _body(2, "turn_b").replace("message.delta", "turn.completed")
    log.append_events(sid, [swept], ids=["ev_b"])  # the sweep came first
    late = log.append_events(sid, [_body(11, "turn_b"), _body(12, "turn_b"), swept], ids=["", "", "ev_b"], lead=2)
    assert late.last == 0 and log.head(sid) == first.last + 1  # nothing added
    # A lead of a durable event and a delta, the durable one again in the rest: each once, in the lead's order.
    tool = _body(3, "turn_c").replace("message.delta", "tool.result")
    ended = _body(4, "turn_c").replace("message.delta", "turn.completed")
    last = log.append_events(sid, [tool, _body(13, "turn_c"), tool, ended], ids=["ev_t", "", "ev_t", "ev_c"],
                             lead=2).last
    tail = log.read(sid, first.last + 1).events
    assert _cursors(tail) == [last - 2, last - 1, last]
    assert [json.loads(e)["type"] for e in tail] == ["tool.result", "message.delta", "turn.completed"]


def test_an_empty_read_continues_from_where_it_was_asked(log: EventLog) -> None:
    sid = _session()
    last, _ = log.append(sid, [_body(0)])
    current = log.read(sid, last)
    assert current.events == [] and current.next == last and current.gone is False
    nothing = log.read(_session(), 0)  # no log at all, from the start
    assert nothing.events == [] and nothing.next == 0 and nothing.gone is False


# --- gone ------------------------------------------------------------------------------

def test_gone_when_the_cursor_is_older_than_what_is_kept(make_log: MakeLog) -> None:
    log = make_log(max_len=10)
    sid = _session()
    cursors = _append_one_by_one(log, sid, [_body(i) for i in range(300)])
    kept = log.read(sid, 0, limit=1000)
    kept_cursors = _cursors(kept.events)
    assert kept.gone is False  # from the start: whatever is kept, nothing to report
    # Trimmed (never below max_len; Redis trims approximately, in whole stream nodes) ...
    assert 10 <= len(kept_cursors) < 300
    # ... from the front: what is kept is the latest events, up to the head.
    assert kept_cursors == cursors[-len(kept_cursors):] and log.head(sid) == cursors[-1]

    oldest = cursors.index(kept_cursors[0])
    # A client that has the event just before the oldest kept one has missed nothing.
    up_to_date = log.read(sid, cursors[oldest - 1], limit=1000)
    assert up_to_date.gone is False and _cursors(up_to_date.events) == kept_cursors
    # One event further back was trimmed: it gets what is left, and the flag.
    behind = log.read(sid, cursors[oldest - 2], limit=1000)
    assert behind.gone is True and _cursors(behind.events) == kept_cursors
    assert log.read(sid, cursors[0]).gone is True

    current = log.read(sid, cursors[-1])
    assert current.gone is False and current.events == []

    # One append of many events is trimmed alike.
    batch_sid = _session()
    last, _ = log.append(batch_sid, [_body(i) for i in range(300)])
    in_batch = _cursors(log.read(batch_sid, 0, limit=1000).events)
    assert 10 <= len(in_batch) < 300 and in_batch[-1] == last

    # wait() does not sit out its timeout on a gone cursor.
    started = time.monotonic()
    waited = log.wait(sid, cursors[0], timeout=5)
    assert waited.gone is True and time.monotonic() - started < 1.0


def test_a_deleted_log_is_gone_and_a_new_one_starts_above_the_old_cursors(log: EventLog) -> None:
    sid = _session()
    old = _append_one_by_one(log, sid, [_body(i) for i in range(3)])
    log.delete(sid)
    assert log.head(sid) == 0
    assert log.read(sid, 0).events == []
    after_delete = log.read(sid, old[-1])
    assert after_delete.events == [] and after_delete.gone is True
    new, _ = log.append(sid, [_body(9)])
    assert new > old[-1]  # nothing a client still holds can be mistaken for the new event
    assert _cursors(log.read(sid, old[-1]).events) == [new]


def test_an_idle_log_expires_after_the_retention(make_log: MakeLog) -> None:
    """STEPRUN_EVENT_RETENTION_SECONDS: "How long a session's event log is kept after its last event"."""
    log = make_log(retention_seconds=2)
    sid = _session()
    first, _ = log.append(sid, [_body(0)])
    time.sleep(1.2)
    second, _ = log.append(sid, [_body(1)])  # each append extends the retention
    time.sleep(1.2)
    assert _cursors(log.read(sid, 0).events) == [first, second]  # 2.4 s after the first, 1.2 s after the last
    time.sleep(2.0)
    assert log.head(sid) == 0
    expired = log.read(sid, first)
    assert expired.events == [] and expired.gone is True


# --- wait --------------------------------------------------------------------------------

def _append_later(log: EventLog, session_id: str, body: str, delay: float, at: list[float]) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        at.append(time.monotonic())
        log.append(session_id, [body])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_wait_returns_as_soon_as_an_event_arrives(log: EventLog) -> None:
    sid = _session()
    start, _ = log.append(sid, [_body(0)])
    appended_at: list[float] = []
    thread = _append_later(log, sid, _body(1), 0.3, appended_at)
    batch = log.wait(sid, start, timeout=10)
    returned_at = time.monotonic()
    thread.join()
    assert [json.loads(e)["data"]["i"] for e in batch.events] == [1]
    assert batch.next == log.head(sid) and batch.gone is False
    # Woken by the append, not by a poll (Redis's fallback poll is once a second).
    assert returned_at - appended_at[0] < 0.6, returned_at - appended_at[0]


def test_a_wait_after_a_wait_finds_its_subscriptions_still_there(redis_client: Any, unique_name: str) -> None:
    """On Redis (the memory log has no subscriptions) a wait that found nothing subscribes the session's two
    channels; they linger a while after it returns, so the next wait (a client polling ``?wait=`` again)
    sends no SUBSCRIBE, and it is still woken by the next append."""
    log = RedisEventLog(redis_client, prefix=unique_name, retention_seconds=3600, max_len=10_000)
    try:
        _wait_after_a_wait(log)
    finally:
        if log._doorbell is not None:
            log._doorbell.close()


def _wait_after_a_wait(log: RedisEventLog) -> None:
    sid = _session()
    start, _ = log.append(sid, [_body(0)])
    assert log.wait(sid, start, timeout=0.3).events == []
    bell = log.doorbell()
    channel = log._keys(sid)[2]
    assert {channel, channel + ":d"} <= set(bell._lingering), "both channels linger after the wait"
    subscribed = []
    real_publish = bell.redis.publish
    bell.redis.publish = lambda name, message: subscribed.append(name) or real_publish(name, message)
    appended_at: list[float] = []
    thread = _append_later(log, sid, _body(1), 0.3, appended_at)
    batch = log.wait(sid, start, timeout=10)
    thread.join()
    assert _cursors(batch.events) == [log.head(sid)]
    assert subscribed == [], "no new subscription: no wake-up of the doorbell's listener"


def test_wait_returns_at_once_when_there_is_something_already(log: EventLog) -> None:
    sid = _session()
    cursors = _append_one_by_one(log, sid, [_body(0), _body(1)])
    started = time.monotonic()
    batch = log.wait(sid, cursors[0], timeout=10)
    assert _cursors(batch.events) == cursors[1:] and time.monotonic() - started < 0.5


def test_wait_returns_empty_after_the_timeout(log: EventLog) -> None:
    sid, other = _session(), _session()
    start, _ = log.append(sid, [_body(0)])
    appended_at: list[float] = []
    thread = _append_later(log, other, _body(1), 0.2, appended_at)  # another session's event
    started = time.monotonic()
    batch = log.wait(sid, start, timeout=0.8)
    elapsed = time.monotonic() - started
    thread.join()
    assert batch.events == [] and batch.next == start and batch.gone is False
    assert 0.75 <= elapsed < 2.0, elapsed
    assert log.wait(_session(), 0, timeout=0.2).events == []


# --- listen ------------------------------------------------------------------------------

def _settled(ring: Any) -> None:
    """Past any ring from setting the listener up (Redis rings once its subscription is confirmed)."""
    deadline = time.monotonic() + 5
    while True:
        ring.clear()
        if not ring.wait(0.3):
            return
        assert time.monotonic() < deadline, "the ring keeps ringing with nothing appended"


def test_listen_rings_on_an_append_to_its_session_only(log: EventLog) -> None:
    sid, other = _session(), _session()
    with log.listen(sid) as ring, log.listen(sid) as second:
        _settled(ring)
        _settled(second)
        appended_at: list[float] = []
        thread = _append_later(log, sid, _body(0), 0.1, appended_at)
        assert ring.wait(3.0) is True
        rung_at = time.monotonic()
        thread.join()
        assert rung_at - appended_at[0] < 0.6
        assert second.wait(1.0) is True  # every listener of the session
        ring.clear()
        log.append(other, [_body(1)])
        assert ring.wait(0.4) is False  # another session's append
    ring.clear()
    log.append(sid, [_body(2)])
    assert ring.wait(0.4) is False  # the block is over: no longer listening


def test_the_durable_doorbell_rings_on_status_events_not_on_deltas(log: EventLog) -> None:
    sid = _session()
    with log.listen(sid, durable=True) as status, log.listen(sid) as every:
        _settled(status)
        _settled(every)
        log.append(sid, [_body(i) for i in range(5)])  # deltas: no id
        assert every.wait(2.0) is True
        assert status.wait(0.4) is False  # a status waiter sleeps through the stream
        done = encode_event("turn.completed", "turn_1", {"output": "x"})
        log.append_events(sid, [_body(5), done], ids=["", "ev_done"])
        assert status.wait(2.0) is True
        status.clear()
        log.append_events(sid, [done], ids=["ev_done"])  # already held: nothing added, no ring
        assert status.wait(0.4) is False


def test_a_status_wait_takes_the_turns_end_from_its_ring_on_redis(log: EventLog) -> None:
    """The long-poll's wait (``wait_turn_status``) looks at the log's tail once, then at each ring: on
    Redis the ring carries its append's events, so the turn's end needs no second look; the memory log's
    rings carry none, so it looks again. Either way the wait ends on the end's ring."""
    from shared.turns.events import wait_turn_status

    sid = _session()
    looks = []
    real_tail = log.tail

    def tail(session_id: str, count: int) -> list[str]:
        looks.append(count)
        return real_tail(session_id, count)

    log.tail = tail  # type: ignore[method-assign]
    log.append_events(sid, [encode_event("turn.started", "turn_1", {})], ids=["ev_started"])
    waiter = threading.Thread(target=wait_turn_status, args=(log, sid, "turn_1", 10.0, lambda: True), daemon=True)
    waiter.start()
    time.sleep(0.5)  # subscribed, its first look taken ("running"), and the subscription's own ring too
    assert waiter.is_alive()
    before = len(looks)
    done = encode_event("turn.completed", "turn_1", {"output": "x"})
    log.append_events(sid, [_body(1), done], ids=["", "ev_done"])
    waiter.join(5.0)
    assert not waiter.is_alive()
    carried = isinstance(log, RedisEventLog)
    assert len(looks) - before == (0 if carried else 1), looks


def test_tail_is_the_newest_bodies_first(log: EventLog) -> None:
    from shared.turns.events import turn_state_in_log

    sid = _session()
    assert log.tail(sid, 5) == []
    bodies = [_body(i) for i in range(4)]
    log.append(sid, bodies)
    assert log.tail(sid, 2) == [bodies[3], bodies[2]]
    assert turn_state_in_log(log, sid, "turn_1") == "running"
    assert turn_state_in_log(log, sid, "turn_2") is None  # none of its events in the tail
    log.append(sid, [encode_event("turn.completed", "turn_1", {}), _body(9, "turn_2")])
    assert turn_state_in_log(log, sid, "turn_1") == "ended"
    assert turn_state_in_log(log, sid, "turn_2") == "running"
    # The turn's newest event further back than the first look (4): the wider one finds it.
    log.append(sid, [encode_event("turn.completed", "turn_2", {})] + [_body(i, "turn_3") for i in range(10)])
    assert turn_state_in_log(log, sid, "turn_2") == "ended"
    assert turn_state_in_log(log, sid, "turn_3") == "running"
    assert turn_state_in_log(log, sid, "turn_4") is None


# --- cancel --------------------------------------------------------------------------------

def test_cancel_requests_are_per_turn_and_reported_by_append(log: EventLog) -> None:
    sid = _session()
    turn, other = f"turn_{secrets.token_hex(6)}", f"turn_{secrets.token_hex(6)}"
    assert log.cancel_requested(turn) is False
    assert log.append(sid, [_body(0, turn)], cancel_turn_id=turn)[1] is False
    log.request_cancel(turn)
    assert log.cancel_requested(turn) is True and log.cancel_requested(other) is False
    cursor, cancelled = log.append(sid, [_body(1, turn)], cancel_turn_id=turn)
    assert cancelled is True and cursor == log.head(sid)  # the events are appended all the same
    assert log.append(sid, [_body(2, other)], cancel_turn_id=other)[1] is False
    assert log.append(sid, [_body(3, turn)])[1] is False  # no turn asked about
    assert len(log.read(sid, 0).events) == 4
    log.ping()


# --- fencing, durable ids, restores ------------------------------------------------------

def test_an_append_from_an_older_attempt_is_refused_whole(log: EventLog) -> None:
    """DESIGN section 5: once an attempt of a turn wrote to the log, no earlier attempt writes again."""
    sid, turn = _session(), f"turn_{secrets.token_hex(4)}"
    first = log.append_events(sid, [_body(0, turn)], fence=Fence(turn, attempt=1)).last
    log.append_events(sid, [_body(1, turn)], fence=Fence(turn, attempt=2))  # the takeover writes
    with pytest.raises(Fenced):
        log.append_events(sid, [_body(2, turn), _body(3, turn)], fence=Fence(turn, attempt=1))
    texts = [json.loads(e)["data"]["text"] for e in log.read(sid, 0).events]
    assert texts == ["piece 0", "piece 1"]  # nothing of the refused batch, not even its first body
    # The same attempt, other turns, and unfenced writers (the API, sweeps) go on.
    assert log.append_events(sid, [_body(4, turn)], fence=Fence(turn, attempt=2)).last > first
    log.append_events(sid, [_body(5, "turn_other")], fence=Fence("turn_other", attempt=1))
    log.append(sid, [_body(6, turn)])


def test_the_terminal_event_closes_the_turn_to_every_attempt(log: EventLog) -> None:
    sid, turn = _session(), f"turn_{secrets.token_hex(4)}"
    log.append_events(sid, [_body(0, turn)], fence=Fence(turn, attempt=3))
    log.append_events(sid, [encode_event("turn.completed", turn, {})], fence=Fence(turn, attempt=3, close=True))
    for attempt in (3, 4):  # a frozen worker's buffer, even of the attempt that finished
        with pytest.raises(Fenced):
            log.append_events(sid, [_body(1, turn)], fence=Fence(turn, attempt=attempt))
    assert [json.loads(e)["type"] for e in log.read(sid, 0).events] == ["message.delta", "turn.completed"]


def test_a_durable_event_is_appended_once_however_often_it_is_republished(log: EventLog) -> None:
    sid = _session()
    bodies = [_body(0), encode_event("step.completed", "turn_1", {"step": 0}), _body(1)]
    first = log.append_events(sid, bodies, ids=["", "ev_1", ""])
    again = log.append_events(sid, [bodies[1]], ids=["ev_1"])
    assert again.last == 0  # nothing added
    types = [json.loads(e)["type"] for e in log.read(sid, 0).events]
    assert types == ["message.delta", "step.completed", "message.delta"] and first.last == log.head(sid)


def test_a_batch_of_durable_events_adds_each_id_it_does_not_hold_once_in_order(log: EventLog) -> None:
    sid = _session()
    done = [encode_event("step.completed", "turn_1", {"step": i}) for i in range(4)]
    log.append_events(sid, [done[0], done[1]], ids=["ev_0", "ev_1"])
    again = log.append_events(sid, [_body(0), done[1], done[2], done[2], _body(1), done[0], done[3]],
                              ids=["", "ev_1", "ev_2", "ev_2", "", "ev_0", "ev_3"])
    events = [json.loads(e) for e in log.read(sid, 0).events]
    assert [(e["type"], e["data"].get("step")) for e in events] == [
        ("step.completed", 0), ("step.completed", 1), ("message.delta", None), ("step.completed", 2),
        ("message.delta", None), ("step.completed", 3)]
    assert again.last == log.head(sid)
    assert log.append_events(sid, done, ids=["ev_0", "ev_1", "ev_2", "ev_3"]).last == 0  # all held: none added


def test_a_log_older_than_its_floor_starts_a_new_era_and_old_cursors_are_gone(log: EventLog) -> None:
    """A Redis restored from an older snapshot: cursors never repeat, and old ones read as gone."""
    sid = _session()
    kept = log.append_events(sid, [_body(0)])
    assert kept.reset is True  # a new log is a new era
    # The writer knows the log issued cursors up to here (Postgres keeps it per session).
    floor = kept.last + 500
    client_cursor = kept.last + 400  # a cursor issued by the log before the restore lost it
    assert log.read(sid, client_cursor).gone is True  # never issued by this log: gone, not silence
    fresh = log.append_events(sid, [_body(1)], floor=floor)
    assert fresh.reset is True and fresh.last > floor
    gone = log.read(sid, client_cursor)
    assert gone.gone is True and gone.since >= floor  # and where to read on
    assert _cursors(log.read(sid, gone.since).events) == [fresh.last]
    assert log.read(sid, gone.since).gone is False
    # At or above the floor nothing changes.
    assert log.append_events(sid, [_body(2)], floor=fresh.last).reset is False


def test_a_cursor_of_an_era_since_lost_is_gone_though_the_next_cursor_is_still_kept(log: EventLog) -> None:
    """A restore keeps the old era's entries: one right after an old cursor does not make that cursor live."""
    sid = _session()
    old = [log.append(sid, [_body(i)])[0] for i in range(3)]
    fresh = log.append_events(sid, [_body(3)], floor=old[-1] + 500)
    assert fresh.reset is True
    batch = log.read(sid, old[0])
    assert _cursors(batch.events)[0] == old[0] + 1  # the old era's next entry is still there ...
    assert batch.gone is True  # ... but the cursor is from before the era: the reader may have missed events
    assert log.read(sid, fresh.last).gone is False and log.read(sid, fresh.last - 1).gone is False


def test_a_reader_keeping_up_costs_one_command_a_gap_four(tmp_path: Any) -> None:
    """The read's count (INFO commandstats of a private server): a cursor the log goes on from is proved kept
    by its own entry, in the one read that also gives the events after it; a cursor that may be gone needs
    the head, the oldest event kept and the era."""
    from tests.support.redis_counter import PrivateRedis

    server = PrivateRedis(tmp_path).start()
    try:
        import redis

        client = redis.Redis.from_url(server.url)
        log = RedisEventLog(client, prefix="count", retention_seconds=3600, max_len=10)
        sid = _session()
        cursors = [log.append(sid, [_body(i)])[0] for i in range(250)]  # trimmed in whole nodes of 100
        assert log.read(sid, cursors[0]).gone is True

        def commands(after: int, limit: int = 500) -> tuple[int, Any]:
            before = server.commandstats()
            batch = log.read(sid, after, limit)
            return sum((server.commandstats() - before).values()), batch

        sent, batch = commands(cursors[-1])  # at the head
        assert (sent, batch.events, batch.next, batch.gone) == (1, [], cursors[-1], False)
        sent, batch = commands(cursors[-3])  # two behind
        assert (sent, _cursors(batch.events), batch.next, batch.gone) == (1, cursors[-2:], cursors[-1], False)
        sent, batch = commands(cursors[-5], limit=2)  # a full batch, then the rest
        assert (sent, _cursors(batch.events), batch.next) == (1, cursors[-4:-2], cursors[-3])
        sent, batch = commands(cursors[0])  # trimmed away
        assert (sent, batch.gone) == (4, True)
        sent, batch = commands(cursors[-1] + 7)  # never issued
        assert (sent, batch.events, batch.gone) == (4, [], True)
    finally:
        server.stop()
