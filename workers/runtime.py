"""The worker process's runtime: built once when the worker starts, kept on the Celery app, closed at shutdown.

Which Celery signal builds it depends on where the tasks run:

- the gevent pool (the Procfile's), and threads: tasks run in the worker's own
  process, so ``worker_init`` builds it there, before the pool starts and
  before the first delivery;
- solo: the same, and its ``worker_process_init`` (sent in that same process)
  finds it built;
- prefork: tasks run in forked children, which must not share the parent's
  database and Redis connections, so each child builds its own in
  ``worker_process_init`` and the parent builds none.

``Runtime.worker_id`` (the owner written into lease rows) is taken then: the
process that runs the steps, with its own pid.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from celery import Celery, signals

from shared.engine.step import build_runtime
from shared.fleet import WorkerBeat
from shared.logs import configure_logging
from shared.runtime import Runtime
from shared.settings import Settings, SettingsError

log = logging.getLogger("steprun.worker")

# The attribute of the Celery app that holds the process's WorkerRuntime.
APP_ATTRIBUTE = "steprun"


class WorkerRuntime:
    """The runtime of the process this Celery app runs tasks in."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._runtime: Runtime | None = None
        self._pid: int | None = None
        self._beat: WorkerBeat | None = None
        self._lock = threading.Lock()

    @property
    def runtime(self) -> Runtime:
        """The runtime built at worker start; a task never builds one itself."""
        rt = self.started
        if rt is None:
            raise RuntimeError("this process has no steprun runtime: it is built when the Celery worker "
                               "starts (worker_init, or worker_process_init in a prefork child)")
        return rt

    @property
    def started(self) -> Runtime | None:
        """The runtime of this process, or None before the worker started (or in a fork of the builder)."""
        return self._runtime if self._pid == os.getpid() else None

    def start(self) -> Runtime:
        """Build this process's runtime (once: a second call returns the same one)."""
        with self._lock:
            if self._runtime is None or self._pid != os.getpid():
                # A runtime inherited through a fork is dropped, not closed: its sockets are the parent's.
                configure_logging(self.settings)  # before the build logs anything (Celery's setup comes later)
                try:
                    self._runtime = build_runtime(self.settings)
                except SettingsError as exc:  # an unsafe database login: Celery would log a signal's error and go on
                    sys.stderr.write(f"steprun worker: configuration error: {exc}\n")
                    sys.stderr.flush()
                    os._exit(3)
                self._pid = os.getpid()
                self._beat = WorkerBeat(self._runtime).start()  # the console's "workers alive"
                log.info("worker runtime ready (%s)", self._runtime.worker_id)
            return self._runtime

    def close(self) -> None:
        """Release this process's connections, once the pool has stopped running steps."""
        with self._lock:
            rt, self._runtime = self.started, None
            beat, self._beat = self._beat, None
        if rt is None:
            return
        if beat is not None:
            beat.stop()
        try:
            rt.close()
        except Exception:  # noqa: BLE001 - the process is exiting: say so, do not fail the exit
            log.warning("closing the worker runtime failed", exc_info=True)


def worker_runtime(app: Celery) -> WorkerRuntime:
    """The WorkerRuntime of ``app`` (see :func:`install_worker_runtime`)."""
    holder = getattr(app, APP_ATTRIBUTE, None)
    if not isinstance(holder, WorkerRuntime):
        raise RuntimeError(f"the Celery app {app.main!r} has no steprun runtime: create it with "
                           "workers.app.create_celery")
    return holder


def _runs_tasks_in_children(pool_cls: Any) -> bool:
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool as PreforkPool

    cls = get_implementation(pool_cls)
    return isinstance(cls, type) and issubclass(cls, PreforkPool)


def install_worker_runtime(app: Celery, settings: Settings) -> WorkerRuntime:
    """Put a WorkerRuntime on ``app`` and connect the signals that build and close it."""
    holder = WorkerRuntime(settings)
    setattr(app, APP_ATTRIBUTE, holder)

    def _on_worker_init(sender: Any = None, **_: Any) -> None:
        # The sender is the WorkController: act only for the app it runs.
        if getattr(sender, "app", None) is not app or _runs_tasks_in_children(sender.pool_cls):
            return
        holder.start()

    def _on_worker_process_init(**_: Any) -> None:
        holder.start()  # a prefork child; under the solo pool the runtime is already there

    def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            holder.close()

    def _on_worker_process_shutdown(**_: Any) -> None:
        holder.close()

    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_process_init.connect(_on_worker_process_init, weak=False)
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
    signals.worker_process_shutdown.connect(_on_worker_process_shutdown, weak=False)
    return holder
