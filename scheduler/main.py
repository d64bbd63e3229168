"""The scheduler process: one loop over the periodic jobs of scheduler/jobs.py."""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from scheduler.jobs import JOBS, Job
from shared.engine.step import build_runtime
from shared.logs import configure_logging
from shared.metrics import serve_metrics
from shared.runtime import Runtime
from shared.settings import deployment_settings, or_exit

log = logging.getLogger("steprun.scheduler")


def run_job(rt: Runtime, job: Job[Any]) -> None:
    """Run ``job`` once and log its report if it did something. A failure is logged, never raised."""
    try:
        line = job.describe(job.run(rt))
    except Exception:  # noqa: BLE001 - Postgres or Redis down: the job runs again at its next turn
        log.exception("%s failed", job.name)
        return
    if line:
        log.info("%s", line)


def run_forever(rt: Runtime, stop: threading.Event, jobs: Sequence[Job[Any]] = JOBS) -> None:
    """Run every job whenever it is due until ``stop`` is set; all are due at the start.

    Each lane of jobs runs in its own thread (the first in this one), so a slow job
    delays only its own lane. A job is due again ``interval`` seconds after its
    last run ended, failed or not.
    """
    lanes: dict[str, list[Job[Any]]] = {}
    for job in jobs:
        lanes.setdefault(job.lane, []).append(job)
    if not lanes:
        return
    first, *others = lanes.values()
    threads = [threading.Thread(target=_run_lane, args=(rt, stop, lane), name=f"scheduler-{lane[0].lane}",
                                daemon=True) for lane in others]
    for thread in threads:
        thread.start()
    _run_lane(rt, stop, first)
    for thread in threads:
        thread.join(timeout=rt.settings.webhook_timeout_seconds + 5)


def _run_lane(rt: Runtime, stop: threading.Event, jobs: Sequence[Job[Any]]) -> None:
    next_run = [0.0] * len(jobs)
    while not stop.is_set():
        for i, job in enumerate(jobs):
            if time.monotonic() >= next_run[i]:
                run_job(rt, job)
                next_run[i] = time.monotonic() + job.interval(rt.settings)
        stop.wait(max(0.0, min(next_run) - time.monotonic()))


def main() -> None:
    settings = deployment_settings("scheduler")
    configure_logging(settings)
    rt = or_exit("scheduler", lambda: build_runtime(settings))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if settings.scheduler_metrics_port:
        serve_metrics(settings, settings.scheduler_metrics_port)
    log.info("scheduler started: %s", ", ".join(
        f"{job.name} every {job.interval(settings):g}s" for job in JOBS))
    run_forever(rt, stop)
    rt.close()
