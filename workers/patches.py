"""What the worker patches under the gevent pool, applied once by the entrypoint (workers/celery_app.py).

Celery monkey-patches the standard library for ``-P gevent`` before it imports
the app; two libraries still block the whole process after that, and the first
two functions fix them (each a no-op unless gevent patched the module it relies
on). The third makes kombu's Redis consumer refill a freed slot at once.
"""
from __future__ import annotations

from typing import Any


def patch_psycopg_for_gevent() -> None:
    """Make psycopg2 yield to other greenlets; otherwise every query blocks the whole process."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return
    if monkey.is_module_patched("socket"):
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()


def green_kombu_sleep() -> None:
    """Make kombu's reconnect back-off yield to other greenlets instead of freezing the worker.

    Celery's gevent patching walks thread-local proxies, which imports
    kombu.utils.functional before ``time`` is patched: its ``from time import
    sleep`` keeps the blocking sleep. While Redis is down the consumer's retry
    back-off (2 s, 4 s, ...) then stops every greenlet, heartbeats included, and
    healthy steps lose their leases (measured: a 4 s Redis outage froze a
    worker for 6 s). Rebinding it restores what the patching meant to do.
    """
    try:
        from gevent import monkey, sleep
    except ImportError:  # pragma: no cover - gevent is a dependency
        return
    if monkey.is_module_patched("time"):
        import kombu.utils.functional

        if kombu.utils.functional.sleep is monkey.get_original("time", "sleep"):
            kombu.utils.functional.sleep = sleep


# How often a worker whose every slot is taken looks whether one has freed (seconds).
FULL_POLL_SECONDS = 0.01


def prompt_refill_when_a_slot_frees() -> None:
    """Make a worker with every slot taken take its next task as soon as one frees, not up to 2 s later.

    With late acks a worker takes no more tasks than it has slots (prefetch = concurrency). Once they are
    all taken, kombu's Redis poller stops reading the queue (no BRPOP) and waits in its poll for Celery's
    whole drain timeout (2 s; 1 s when it waits on nothing): a task ending meanwhile frees a slot, but
    nothing wakes the poll to take a task for it. Under a load of more steps than slots the worker then
    runs in bursts: every slot refilled at once, all idle again (measured at 128 users on 2 workers of
    50: 58-63 turns/s with the machine 81-86 % busy, the running steps falling to 0 with 128 turns queued,
    against 82 at 64 users). So while a queue is paused for want of a slot, each poll waits at most
    :data:`FULL_POLL_SECONDS`, and a freed slot is refilled within that. That costs a wake-up per 10 ms
    while the worker is full, and nothing otherwise.
    """
    from kombu.transport import redis as transport

    poller = transport.MultiChannelPoller
    if getattr(poller.get, "steprun_prompt", False):
        return
    original = poller.get

    def get(self: Any, callback: Any, timeout: float | None = None) -> Any:
        if timeout is None or timeout > FULL_POLL_SECONDS:
            if any(channel.active_queues and not channel.qos.can_consume() for channel in self._channels):
                timeout = FULL_POLL_SECONDS
        return original(self, callback, timeout)

    get.steprun_prompt = True  # type: ignore[attr-defined]
    poller.get = get  # type: ignore[method-assign]


def apply_gevent_patches() -> None:
    """Every patch above, in order (safe to call more than once)."""
    patch_psycopg_for_gevent()
    green_kombu_sleep()
    prompt_refill_when_a_slot_frees()
