"""Queue latency: how long steps wait for a worker, computed from Postgres.

This is the figure to scale workers on (docs/scaling.md, infra/k8s/keda.yaml):
queue *length* misleads when steps differ in length, and the broker's list
shows neither in-flight steps nor tasks Redis lost. Postgres knows exactly: a
step is waiting from the moment it is sent (``turns.enqueued_at``: set when a
turn is activated, when the previous step commits, when it is resumed or
re-sent by the scheduler) until a worker claims its lease.

- ``oldest_wait_seconds``: age of the oldest sent-but-unclaimed step (0 when
  none waits). Steps queued *behind* another turn of the same session are not
  sent yet (their ``enqueued_at`` is NULL) and do not count: no worker could
  run them.
- ``start_delay_p95_seconds``: p95 of enqueue-to-start over the first steps of
  turns that started in the last ``window`` seconds. Only first steps: a turn
  row keeps one ``enqueued_at``, overwritten by each later step, so only a
  turn's first claim (``started_at``) pairs with the enqueue that caused it.

Served as ``steprun stats`` and as gauges on ``/metrics`` (computed on scrape).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from shared.auth.principal import SYSTEM
from shared.clock import aware
from shared.db import set_scope
from shared.models import Turn, TurnStatus

# Turns with a step to run (a paused turn, requires_action, waits for its user, not for a worker).
RUNNABLE_SQL = f"status IN ('{TurnStatus.QUEUED}', '{TurnStatus.IN_PROGRESS}')"
RUNNING_SQL = f"status = '{TurnStatus.IN_PROGRESS}'"
WAITING = f"{RUNNABLE_SQL} AND lease_expires_at IS NULL AND enqueued_at IS NOT NULL"

# One statement, for Postgres. KEDA's postgresql trigger (infra/k8s/keda.yaml) runs the first column alone.
QUEUE_SQL = f"""
SELECT
  COALESCE(EXTRACT(EPOCH FROM now() - min(enqueued_at) FILTER (WHERE {WAITING})), 0) AS oldest_wait_seconds,
  count(*) FILTER (WHERE {WAITING}) AS waiting,
  count(*) FILTER (WHERE {RUNNING_SQL} AND lease_expires_at >= now()) AS running,
  count(*) FILTER (WHERE {RUNNING_SQL} AND lease_expires_at < now()) AS expired_leases
FROM turns
WHERE {RUNNABLE_SQL}
"""

START_DELAY_SQL = """
SELECT
  percentile_cont(0.95) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM started_at - enqueued_at)) AS p95,
  count(*) AS samples
FROM turns
WHERE started_at >= now() - make_interval(secs => :window) AND enqueued_at <= started_at
"""


@dataclass(frozen=True)
class QueueStats:
    oldest_wait_seconds: float
    waiting: int
    running: int
    expired_leases: int
    start_delay_p95_seconds: float | None
    start_delay_samples: int
    window_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def queue_stats(db: Session, window_seconds: float = 60.0) -> QueueStats:
    """The queue-latency figures, read in one short transaction (no locks taken)."""
    if db.get_bind().dialect.name != "postgresql":
        return _queue_stats_portable(db, window_seconds)
    # Aggregates over every tenant: ``db`` is the system path's (the owner's login, see shared.db), as the
    # scheduler's sweeps; on the application's login row-level security would hide every turn.
    q = db.execute(text(QUEUE_SQL)).one()
    d = db.execute(text(START_DELAY_SQL), {"window": window_seconds}).one()
    return QueueStats(float(q.oldest_wait_seconds), int(q.waiting), int(q.running), int(q.expired_leases),
                      None if d.p95 is None else float(d.p95), int(d.samples), window_seconds)


def _queue_stats_portable(db: Session, window_seconds: float) -> QueueStats:
    """The embedded (SQLite) mode: the same figures computed in Python over the active turns."""
    now = datetime.now(timezone.utc)
    rows = db.query(Turn.status, Turn.lease_expires_at, Turn.enqueued_at).filter(
        Turn.status.in_((TurnStatus.QUEUED, TurnStatus.IN_PROGRESS))).all()
    waits, running, expired = [], 0, 0
    for status, lease, enqueued in rows:
        if lease is None and enqueued is not None:
            waits.append((now - aware(enqueued)).total_seconds())
        elif status == TurnStatus.IN_PROGRESS and lease is not None:
            running, expired = (running + 1, expired) if aware(lease) >= now else (running, expired + 1)
    since = now - timedelta(seconds=window_seconds)
    delays: list[float] = []
    for started_at, enqueued_at in (db.query(Turn.started_at, Turn.enqueued_at)
                                    .filter(Turn.started_at.is_not(None)).filter(Turn.enqueued_at.is_not(None)).all()):
        if started_at is None or enqueued_at is None:
            continue  # the query leaves these out; this tells the type checker so
        started, enqueued = aware(started_at), aware(enqueued_at)
        if started >= since and enqueued <= started:
            delays.append((started - enqueued).total_seconds())
    delays.sort()
    p95 = delays[min(len(delays) - 1, int(0.95 * len(delays)))] if delays else None
    return QueueStats(max(waits, default=0.0), len(waits), running, expired, p95, len(delays), window_seconds)


class QueueLatencyCollector:
    """A Prometheus collector that runs the query when /metrics is scraped.

    On scrape rather than on a timer: no background thread, and every web
    process answers with the same fresh figure. A failed query yields no
    samples (the scrape still succeeds; the absence is what alerts).
    """

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def describe(self) -> list[Any]:
        return []  # computed on scrape: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            with self.sessions() as db:
                set_scope(db, SYSTEM)  # queue figures span every tenant: the narrow system path
                stats = queue_stats(db)
                db.rollback()
        except Exception:  # noqa: BLE001 - a scrape must not fail because Postgres is slow or down
            return
        yield GaugeMetricFamily("steprun_queue_oldest_wait_seconds",
                                "Age of the oldest step sent to the workers and not yet claimed.",
                                value=stats.oldest_wait_seconds)
        yield GaugeMetricFamily("steprun_queue_waiting_steps", "Steps sent and not yet claimed.",
                                value=stats.waiting)
        yield GaugeMetricFamily("steprun_queue_running_steps", "Steps holding a live lease.", value=stats.running)
        yield GaugeMetricFamily("steprun_queue_expired_leases",
                                "Steps whose lease expired (worker lost), not yet swept.",
                                value=stats.expired_leases)
        if stats.start_delay_p95_seconds is not None:
            yield GaugeMetricFamily("steprun_queue_start_delay_p95_seconds",
                                    "p95 enqueue-to-start of first steps over the last minute.",
                                    value=stats.start_delay_p95_seconds)


_collector: QueueLatencyCollector | None = None
_lock = threading.Lock()


def register_queue_metrics(sessions: sessionmaker[Session]) -> QueueLatencyCollector:
    """Expose the queue gauges on this process's /metrics (shared/metrics.py).

    Once per process: a second app in the same process (tests) re-points the
    one collector at its own database instead of registering twice.
    """
    global _collector
    from shared.metrics import register_on_scrape

    with _lock:
        if _collector is None:
            _collector = QueueLatencyCollector(sessions)
            register_on_scrape(_collector)
        _collector.sessions = sessions
        return _collector
