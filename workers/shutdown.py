"""Worker shutdown that loses nothing: running steps finish, or hand themselves back.

On SIGTERM Celery stops taking tasks and waits for the running ones (a warm
shutdown); the platform's SIGKILL follows after its grace period (30 s on
Heroku and Kubernetes). Two stages, both on the runtime:

- at once, ``stopping``: no new step starts in this process. Celery's gevent
  pool keeps receiving deliveries while it waits for running tasks (measured:
  a step re-enqueued by a shutting-down worker came straight back to it), so
  each one is passed back to the queue unclaimed, for a worker that stays;
- after STEPRUN_SHUTDOWN_GRACE_SECONDS, ``draining``: a step still running is
  handed back instead of waiting to be killed. It gives up its lease and
  re-enqueues itself, so another worker resumes it from its checkpoint at once
  rather than after the lease runs out (shared/engine/watch.py).

If the process dies anyway, the lease sweep recovers the step: nothing is lost.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import Celery, signals

from workers.runtime import worker_runtime

log = logging.getLogger("steprun.worker")


def _call_later(seconds: float, fn: Callable[[], object]) -> None:
    """Run ``fn`` later without blocking: Celery calls us inside a signal handler (the gevent loop)."""
    try:
        from gevent import monkey, spawn_later
    except ImportError:  # pragma: no cover - gevent is a dependency
        monkey = None
    if monkey is not None and monkey.is_module_patched("threading"):
        spawn_later(seconds, fn)  # a Timer would block on its start-up in the loop's callback
        return
    timer = threading.Timer(seconds, fn)
    timer.daemon = True
    timer.start()


def install_shutdown_drain(app: Celery) -> None:
    """Connect the drain to Celery's shutdown signal (warm SIGTERM and cold SIGQUIT alike)."""
    holder = worker_runtime(app)

    def _on_shutdown(**_: Any) -> None:
        rt = holder.started
        if rt is None or rt.stopping.is_set():
            return  # this process runs no steps (a prefork parent, a worker still starting), or already stopping
        rt.stopping.set()
        grace = rt.settings.shutdown_grace_seconds
        log.warning("worker shutting down: no new steps; running ones may finish for %ss, then are handed back",
                    grace)
        _call_later(grace, rt.draining.set)

    signals.worker_shutting_down.connect(_on_shutdown, weak=False)
