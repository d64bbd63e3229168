"""Celery tasks: thin. Ids in, the shared step code does the work."""
from __future__ import annotations

import logging
import threading

from celery import Task, shared_task

from shared.engine.step import build_runtime, run_step
from shared.logs import configure_logging, log_context
from shared.runtime import Runtime

log = logging.getLogger("steprun.worker")
_runtime_lock = threading.Lock()


class StepTask(Task):
    """Holds the process's runtime (engine, Redis, agents), built on first use in the worker."""

    _runtime: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        with _runtime_lock:
            if StepTask._runtime is None:
                settings = self.app.conf.steprun_settings
                configure_logging(settings)
                StepTask._runtime = build_runtime(settings)
            return StepTask._runtime


@shared_task(name="steps.run", base=StepTask, bind=True, ignore_result=True)
def run_step_task(self: StepTask, turn_id: str, step: int) -> str:
    # Set inside the task's own greenlet: contextvars are not inherited from the pool's.
    with log_context(turn_id=turn_id, step=step):
        try:
            outcome = run_step(self.runtime, turn_id, step)
        except Exception:  # noqa: BLE001 - the lease expires and the scheduler re-enqueues the step
            log.exception("turn %s step %s: attempt failed", turn_id, step)
            return "error"
        log.info("turn %s step %s: %s", turn_id, step, outcome)
        return outcome
