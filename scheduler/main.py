"""Periodic sweeps: lease recovery and lost-task re-enqueue."""
from __future__ import annotations

import logging
import signal
import threading

from shared.logs import configure_logging
from shared.recovery import sweep
from shared.runtime import Runtime
from shared.settings import Settings

log = logging.getLogger("steprun.scheduler")


def run_forever(rt: Runtime, stop: threading.Event) -> None:
    """Sweep every ``sweep_interval`` seconds until ``stop`` is set. A failed sweep is retried next round."""
    while not stop.is_set():
        try:
            report = sweep(rt)
            if report:
                log.info("sweep: %s", report)
        except Exception:  # noqa: BLE001 - Postgres or Redis down: try again next round
            log.exception("sweep failed")
        stop.wait(rt.settings.sweep_interval)


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    rt = Runtime.create(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("scheduler started: sweeping every %ss", settings.sweep_interval)
    run_forever(rt, stop)
    rt.close()
