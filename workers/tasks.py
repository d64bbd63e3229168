"""Celery tasks: thin. Ids in, the shared step code does the work."""
from __future__ import annotations

import logging

from celery import Task, shared_task

from shared.engine.step import run_step
from shared.logs import log_context
from shared.runtime import Runtime
from workers.runtime import worker_runtime

log = logging.getLogger("steprun.worker")


class StepTask(Task):
    """A step task: runs on the runtime its app built when the worker started (workers/runtime.py)."""

    @property
    def runtime(self) -> Runtime:
        return worker_runtime(self.app).runtime


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
