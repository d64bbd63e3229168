"""The worker's logging and its Prometheus endpoint, set up when Celery boots the worker."""
from __future__ import annotations

from typing import Any

from celery.signals import setup_logging, worker_init

from shared.logs import configure_logging
from shared.metrics import serve_metrics
from shared.settings import Settings


def install_worker_observability(settings: Settings) -> None:
    """Connect Celery's boot signals (process-wide, so this runs once per process)."""

    def _logging(**_: Any) -> None:
        # Connected, this replaces Celery's own logging setup: one format (STEPRUN_LOG_FORMAT) for every line.
        configure_logging(settings)

    def _metrics(**_: Any) -> None:
        # worker_init runs in the main process before the pool starts; under the gevent
        # pool the tasks run in this same process (see shared/metrics.py for prefork).
        if settings.worker_metrics_port:
            serve_metrics(settings, settings.worker_metrics_port)

    setup_logging.connect(_logging, weak=False)
    worker_init.connect(_metrics, weak=False)
