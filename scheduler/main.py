"""Periodic sweeps: lease recovery, lost-task re-enqueue, expiry of pauses and idle sessions, retention."""
from __future__ import annotations

import logging
import signal
import threading

from shared.engine.step import build_runtime
from shared.logs import configure_logging
from shared.metrics import serve_metrics
from shared.runtime import Runtime
from shared.settings import Settings
from shared.storage.sweep import StorageSweep, observe_sweep
from shared.turns.housekeeping import Housekeeping
from shared.turns.recovery import sweep

log = logging.getLogger("steprun.scheduler")


def run_forever(rt: Runtime, stop: threading.Event) -> None:
    """Sweep every ``sweep_interval`` seconds until ``stop`` is set. A failed sweep is retried next round."""
    storage = StorageSweep(rt)
    housekeeping = Housekeeping(rt)
    while not stop.is_set():
        try:
            report = sweep(rt)
            observe_sweep(report)
            if report:
                log.info("sweep: %s", report)
            storage.run_if_due()
            done = housekeeping.run_if_due()
            if done and (done.sessions_deleted or done.checkpoints_pruned):
                log.info("housekeeping: %s", done)
        except Exception:  # noqa: BLE001 - Postgres or Redis down: try again next round
            log.exception("sweep failed")
        stop.wait(rt.settings.sweep_interval)


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    rt = build_runtime(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if settings.scheduler_metrics_port:
        serve_metrics(settings, settings.scheduler_metrics_port)
    log.info("scheduler started: sweeping every %ss", settings.sweep_interval)
    run_forever(rt, stop)
    rt.close()
