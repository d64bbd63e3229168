"""Sending step tasks: CeleryQueue (production) and InProcessQueue (embedded) deliver the same thing.

``enqueue_step(turn_id, step)`` hands exactly those ids to whatever runs steps.
For Celery that is a worker, which is not started here: the message is read off
the configured queue in Redis, decoded as a worker decodes it (the JSON
serializer is the only one a worker accepts), and its arguments are bound to the
signature of the worker's ``steps.run`` task. For the in-process queue it is the
step runner the runtime passes in, called on a thread of its pool.
"""
from __future__ import annotations

import base64
import inspect
import json
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shared.queue import STEP_TASK, CeleryQueue, InProcessQueue, TaskQueue
from shared.settings import Settings
from tests.support.processes import REDIS_URL

Delivery = tuple[str, int]


class Twin:
    """A queue, and what reached the other end of it."""

    queue: TaskQueue

    def delivered(self, count: int, timeout: float = 10) -> list[Delivery]:
        """What was delivered so far, once at least ``count`` deliveries arrived (or at the timeout)."""
        raise NotImplementedError


class Celery(Twin):
    def __init__(self, redis_client: Any, queue_name: str):
        from workers.tasks import run_step_task

        self.redis, self.queue_name = redis_client, queue_name
        self.queue = CeleryQueue(Settings(redis_url=REDIS_URL, queue_name=queue_name))
        self.task_name = run_step_task.name
        self.task_signature = inspect.signature(run_step_task.run)
        self._got: list[Delivery] = []

    def delivered(self, count: int, timeout: float = 10) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while len(self._got) < count and time.monotonic() < deadline:
            raw = self.redis.rpop(self.queue_name)  # kombu pushes on the left and a worker takes from the right
            if raw is None:
                time.sleep(0.02)
                continue
            self._got.append(self._decode(raw))
        return list(self._got)

    def _decode(self, raw: bytes) -> Delivery:
        message = json.loads(raw)
        assert message["content-type"] == "application/json"  # a worker accepts JSON only
        assert message["properties"]["delivery_info"]["routing_key"] == self.queue_name
        assert message["headers"]["task"] == STEP_TASK == self.task_name
        assert message["properties"]["body_encoding"] == "base64"
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        self.task_signature.bind(*args, **kwargs)  # the worker's task takes exactly these
        assert kwargs == {}
        turn_id, step = args
        return turn_id, step


class InProcess(Twin):
    def __init__(self) -> None:
        self._got: list[Delivery] = []
        self._cond = threading.Condition()
        self.queue = InProcessQueue(self._run, workers=4)

    def _run(self, turn_id: str, step: int) -> None:
        if turn_id.startswith("slow"):
            time.sleep(1.0)
        with self._cond:
            self._got.append((turn_id, step))
            self._cond.notify_all()

    def delivered(self, count: int, timeout: float = 10) -> list[Delivery]:
        with self._cond:
            self._cond.wait_for(lambda: len(self._got) >= count, timeout)
            return list(self._got)


@pytest.fixture(params=["celery", "in_process"])
def twin(request: pytest.FixtureRequest) -> Iterator[Twin]:
    made: Twin
    if request.param == "celery":
        made = Celery(request.getfixturevalue("redis_client"), request.getfixturevalue("unique_name"))
    else:
        made = InProcess()
    yield made
    made.queue.close()


def _turn() -> str:
    return f"turn_{secrets.token_hex(8)}"


def test_enqueue_delivers_the_ids_to_the_step_runner(twin: Twin) -> None:
    a, b = _turn(), _turn()
    sent = [(a, 0), (a, 1), (b, 0)]
    for turn_id, step in sent:
        twin.queue.enqueue_step(turn_id, step)
    got = twin.delivered(3)
    assert sorted(got) == sorted(sent)
    assert all(type(step) is int for _, step in got)  # the step number stays a number
    time.sleep(0.3)
    assert len(twin.delivered(4, timeout=0)) == 3  # once each


def test_enqueue_does_not_wait_for_the_step(twin: Twin) -> None:
    slow = f"slow_{secrets.token_hex(8)}"
    started = time.monotonic()
    twin.queue.enqueue_step(slow, 0)
    assert time.monotonic() - started < 0.5
    assert twin.delivered(1) == [(slow, 0)]


def test_concurrent_enqueues_each_arrive_once(twin: Twin) -> None:
    turns = [_turn() for _ in range(8)]
    barrier = threading.Barrier(len(turns))

    def send(turn_id: str) -> None:
        barrier.wait()
        for step in range(20):
            twin.queue.enqueue_step(turn_id, step)

    threads = [threading.Thread(target=send, args=(t,)) for t in turns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = twin.delivered(160, timeout=20)
    assert sorted(got) == sorted((t, s) for t in turns for s in range(20))


def test_enqueue_after_close_does_not_raise(twin: Twin) -> None:
    """A request or sweep finishing during shutdown may still enqueue: the step's row is in Postgres,
    and the scheduler re-sends a step nothing ran (so a queue may drop it, or deliver it)."""
    twin.queue.close()
    twin.queue.enqueue_step(_turn(), 0)
    twin.queue.close()


def _shape(message: dict[str, Any]) -> dict[str, Any]:
    """A kombu Redis message with its per-message ids and the publishing process's names taken out."""
    headers, props = dict(message["headers"]), dict(message["properties"])
    task_id = headers.pop("id")
    assert headers.pop("root_id") == props.pop("correlation_id") == task_id
    headers.pop("origin")
    props.pop("delivery_tag")
    props.pop("reply_to")
    body = json.loads(base64.b64decode(message["body"]))
    return {**message, "headers": headers, "properties": props, "body": body}


def test_the_step_message_is_the_one_send_task_writes(redis_client: Any, unique_name: str) -> None:
    """The queue writes the step's message itself (one LPUSH): it is Celery's own, field for field."""
    queue = CeleryQueue(Settings(redis_url=REDIS_URL, queue_name=unique_name))
    try:
        queue.enqueue_step("turn_abc", 3)
        queue.app.send_task(STEP_TASK, args=["turn_abc", 3], queue=unique_name)  # Celery's own path
        ours, celery = (json.loads(raw) for raw in redis_client.lrange(unique_name, 0, -1)[::-1])
    finally:
        queue.close()
    assert _shape(ours) == _shape(celery)
    assert list(ours) == list(celery) and list(ours["headers"]) == list(celery["headers"])
    assert ours["headers"]["origin"] == celery["headers"]["origin"]
    assert ours["properties"]["reply_to"] == celery["properties"]["reply_to"]
    assert ours["headers"]["id"] != celery["headers"]["id"]
