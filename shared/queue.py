"""Sending step tasks: by name through Celery, or to in-process threads (embedded).

The API and the scheduler enqueue through this interface and never import
worker code: a task is addressed as ``"steps.run"`` with ids only.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from shared.settings import Settings

STEP_TASK = "steps.run"
log = logging.getLogger(__name__)
# The most waiting messages the lost-task sweep reads to tell a queued step from a lost one; past it
# the queue is not read (a sweep a second must not copy a long backlog) and the plain threshold applies.
INSPECT_LIMIT = 1000


class TaskQueue(Protocol):
    def enqueue_step(self, turn_id: str, step: int) -> None: ...

    def close(self) -> None: ...


def celery_config(settings: Settings) -> dict[str, Any]:
    """Broker settings shared by the producer (API, scheduler) and the worker."""
    return {
        "broker_url": settings.redis_url,
        "task_default_queue": settings.queue_name,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Results are in Postgres; a result backend would only cost Redis writes.
        "task_ignore_result": True,
        "result_backend": None,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Longer than any step can run (the step watch enforces step_time_limit,
            # plus a second of grace and up to ~30 s of commit retries), so a slow
            # step is never redelivered while it still runs. Were it redelivered,
            # the fenced claim would skip it, but only at the cost of a round trip.
            # Fast recovery from a dead worker comes from the Postgres lease sweep
            # (lease_seconds) and the lost-task sweep (waiting_steps), never from
            # this timeout (see workers/app.py);
            # past it, the scheduler hands stranded messages back (restore_unacked).
            "visibility_timeout": int(2 * settings.step_time_limit) + 60,
        },
    }


# The task's embedded options in Celery's message protocol 2 (no callbacks, no canvas).
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class StepMessages:
    """The step task's message exactly as ``Celery.send_task`` + kombu's Redis transport write it, pushed
    with one LPUSH on a client the caller already holds.

    ``send_task`` costs ~0.8 CPU-ms a message (measured): routing, option merging, a producer from the
    pool, signals, and kombu building a new redis-py client for every publish. Every step of every turn
    pays it, in the API (a turn's first step) and the workers (the next steps). What reaches Redis is the
    same: protocol 2 headers (``task``, ``id``, ``argsrepr``…), the JSON body base64-encoded, a
    ``delivery_tag``, on the queue's list (priority 0 is the list named after the queue), so the workers
    consume it as any Celery message (tests/contract/test_task_queue.py compares it with send_task's).
    """

    def __init__(self, client: Any, queue: str, reply_to: str):
        self.client, self.queue, self.reply_to = client, queue, reply_to
        self.origin = f"gen{os.getpid()}@{socket.gethostname()}"  # Celery's anon_nodename()

    def message(self, turn_id: str, step: int) -> str:
        task_id = str(uuid.uuid4())
        args = [turn_id, step]
        body = json.dumps([args, {}, _EMBED]).encode()
        headers: dict[str, Any] = {
            "lang": "py", "task": STEP_TASK, "id": task_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
            "parent_id": None, "argsrepr": repr(args), "kwargsrepr": "{}", "origin": self.origin,
            "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        }
        return json.dumps({
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": task_id, "reply_to": self.reply_to, "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": self.queue}, "priority": 0,
                "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
            },
        })

    def send(self, turn_id: str, step: int) -> None:
        self.client.lpush(self.queue, self.message(turn_id, step))


class CeleryQueue:
    def __init__(self, settings: Settings, client: Any = None):
        """``client``: a redis-py client on the broker (the runtime's); one is made from the URL otherwise."""
        from celery import Celery

        self.settings = settings
        self.app = Celery("steprun-producer")
        self.app.conf.update(celery_config(settings))
        self._own_client = None
        self._messages: StepMessages | None = None
        # A plain Redis broker: the message is written directly. Anything else (a sentinel URL, ...) goes
        # through send_task.
        if settings.redis_url and settings.redis_url.split("://", 1)[0] in ("redis", "rediss"):
            if client is None:
                import redis

                client = self._own_client = redis.Redis.from_url(settings.redis_url)
            self._messages = StepMessages(client, settings.queue_name, self.app.thread_oid)

    def enqueue_step(self, turn_id: str, step: int) -> None:
        if self._messages is not None:
            self._messages.send(turn_id, step)
        else:
            self.app.send_task(STEP_TASK, args=[turn_id, step], queue=self.settings.queue_name)

    def waiting_steps(self, limit: int = INSPECT_LIMIT) -> set[tuple[str, int]] | None:
        """The (turn id, step) of every step task waiting in the broker's queue; None if over ``limit`` waiting.

        Waiting means not yet taken by any worker: a task a worker took is gone from the list (kombu
        keeps it in its "unacked" hash until acknowledged), so a step that is neither claimed nor
        waiting was taken by a worker that died before claiming it, or its message was lost.
        """
        with self.app.connection_for_read() as conn:
            channel = conn.default_channel
            queue = self.settings.queue_name
            # kombu's Redis transport keeps one list per priority step (the plain name for the lowest).
            keys = list(dict.fromkeys(channel._q_for_pri(queue, p) for p in channel.priority_steps))
            with channel.conn_or_acquire() as client:
                with client.pipeline() as pipe:
                    for key in keys:
                        pipe.llen(key)
                    lengths = pipe.execute()
                if sum(int(n) for n in lengths) > limit:
                    return None
                with client.pipeline() as pipe:
                    for key, n in zip(keys, lengths, strict=True):
                        if n:
                            pipe.lrange(key, 0, -1)
                    lists = pipe.execute()
        waiting: set[tuple[str, int]] = set()
        for raw in (raw for lst in lists for raw in lst):
            step = _step_of(raw)
            if step is not None:
                waiting.add(step)
        return waiting

    def restore_unacked(self) -> None:
        """Hand back messages a dead worker never acked, once older than the visibility timeout.

        Only async-loop (prefork) workers run kombu's restore sweep; gevent-pool
        workers never do (celery#4976), so without this the messages of every
        SIGKILLed worker would stay in Redis for good. By now they are duplicates
        (the lease sweep re-sent their steps long ago): the fenced claim skips them.
        """
        with self.app.connection_for_write() as conn:
            restore = getattr(getattr(conn.default_channel, "qos", None), "restore_visible", None)
            if restore is not None:
                restore(num=1000)

    def close(self) -> None:
        self.app.close()
        if self._own_client is not None:
            self._own_client.close()


def _step_of(raw: bytes | str) -> tuple[str, int] | None:
    """(turn id, step) of one kombu Redis message of the step task, or None if it is something else."""
    try:
        payload = json.loads(raw)
        headers = payload.get("headers") or {}
        if headers.get("task", STEP_TASK) != STEP_TASK:
            return None
        body = payload["body"]
        if (payload.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        # Celery's message protocol 2: [args, kwargs, embed]; protocol 1: {"args": [...], ...}.
        args = decoded[0] if isinstance(decoded, list) else decoded["args"]
        return str(args[0]), int(args[1])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class InProcessQueue:
    """The embedded mode's queue: a thread pool that runs the same step code."""

    def __init__(self, run: Callable[[str, int], None], workers: int = 8):
        self._run = run
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="steprun-step")
        self._lock = threading.Lock()
        self._closed = False

    def enqueue_step(self, turn_id: str, step: int) -> None:
        with self._lock:
            if self._closed:
                return  # the scheduler re-enqueues it after a restart
            self._pool.submit(self._safe_run, turn_id, step)

    def _safe_run(self, turn_id: str, step: int) -> None:
        try:
            self._run(turn_id, step)
        except Exception:  # noqa: BLE001 - the lease sweep retries; log and carry on
            log.exception("step %s/%s failed", turn_id, step)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
