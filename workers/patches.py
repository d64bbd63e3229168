"""What the worker patches under the gevent pool, applied once by the entrypoint (workers/celery_app.py).

Celery monkey-patches the standard library for ``-P gevent`` before it imports
the app; two libraries still block the whole process after that, and these
functions fix them. Each is a no-op unless gevent patched the module it relies on.
"""
from __future__ import annotations


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


def apply_gevent_patches() -> None:
    """Every patch above, in order (safe to call more than once)."""
    patch_psycopg_for_gevent()
    green_kombu_sleep()
