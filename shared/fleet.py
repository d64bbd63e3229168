"""The fleet as an operator sees it: workers alive, and the queue over the last hour.

- Each worker process renews a row in ``worker_heartbeats`` every
  STEPRUN_WORKER_BEAT_SECONDS (:class:`WorkerBeat`) and deletes it when it
  stops; a row older than three beats is a worker that died.
- The scheduler samples :func:`shared.stats.queue_stats` every
  STEPRUN_QUEUE_SAMPLE_SECONDS into ``queue_samples`` (:func:`record_sample`):
  the depth chart. Latency needs no sampling: each committed step's span keeps
  its queue latency (what ``steprun_queue_latency_seconds`` observes), so
  p50/p99 per bucket come from ``trace_spans``.

Everything here spans every tenant (workers and the queue are shared), read
on the system path, as /metrics is.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from shared.auth.principal import SYSTEM
from shared.clock import aware, utcnow
from shared.db import rowcount, unit_of_work
from shared.models import QueueSample, TraceSpan, Turn, TurnStatus, WorkerHeartbeat
from shared.runtime import Runtime
from shared.stats import queue_stats

log = logging.getLogger(__name__)
# A worker that missed this many beats is shown as gone, and its row is deleted an hour later.
MISSED_BEATS = 3
KEEP_SAMPLES = timedelta(days=1)
FORGET_WORKERS = timedelta(hours=1)


class WorkerBeat:
    """This process's row in ``worker_heartbeats``, renewed by a daemon thread (a greenlet under gevent)."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at = utcnow()

    def start(self) -> WorkerBeat:
        self._thread = threading.Thread(target=self._run, name="worker-beat", daemon=True)
        self._thread.start()
        return self

    def beat(self) -> None:
        now = utcnow()
        with unit_of_work(self.rt.sessions, SYSTEM) as db:
            renewed = rowcount(db.execute(update(WorkerHeartbeat).where(
                WorkerHeartbeat.worker_id == self.rt.worker_id).values(beat_at=now)))
            if not renewed:
                db.add(WorkerHeartbeat(worker_id=self.rt.worker_id, started_at=self.started_at, beat_at=now))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - Postgres away: the next beat tries again
                log.warning("worker heartbeat failed", exc_info=True)
            self._stop.wait(self.rt.settings.worker_beat_seconds)

    def stop(self) -> None:
        """Stop beating and remove the row (a clean exit is not a dead worker)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with unit_of_work(self.rt.sessions, SYSTEM) as db:
                db.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == self.rt.worker_id))
        except Exception:  # noqa: BLE001 - exiting anyway; the row ages out
            log.warning("could not remove the worker heartbeat row", exc_info=True)


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    started_at: datetime
    beat_age_seconds: float
    alive: bool
    running_steps: int


def workers(db: Session, rt: Runtime) -> list[WorkerRow]:
    """Every worker seen in the last hour, newest beat first, with the steps it holds a live lease on."""
    now = utcnow()
    running = dict(db.execute(
        select(Turn.lease_owner, func.count()).where(
            Turn.status == TurnStatus.IN_PROGRESS, Turn.lease_expires_at >= now, Turn.lease_owner.is_not(None))
        .group_by(Turn.lease_owner)).all())
    rows = db.scalars(select(WorkerHeartbeat).where(WorkerHeartbeat.beat_at >= now - FORGET_WORKERS)
                      .order_by(WorkerHeartbeat.beat_at.desc())).all()
    limit = MISSED_BEATS * rt.settings.worker_beat_seconds
    out = []
    for row in rows:
        age = max(0.0, (now - aware(row.beat_at)).total_seconds())
        out.append(WorkerRow(row.worker_id, aware(row.started_at), age, age <= limit,
                             int(running.get(row.worker_id, 0))))
    return out


def record_sample(rt: Runtime, lease_expiries: int = 0) -> QueueSample:
    """One row of the queue's figures now; also drops samples past a day and workers gone an hour."""
    now = utcnow()
    with unit_of_work(rt.sessions, SYSTEM) as db:
        stats = queue_stats(db)
        row = QueueSample(at=now, waiting=stats.waiting, running=stats.running,
                          expired_leases=stats.expired_leases, oldest_wait_seconds=stats.oldest_wait_seconds,
                          lease_expiries=lease_expiries)
        db.add(row)
        db.execute(delete(QueueSample).where(QueueSample.at < now - KEEP_SAMPLES))
        db.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.beat_at < now - FORGET_WORKERS))
    return row


def samples(db: Session, since: datetime) -> list[QueueSample]:
    return list(db.scalars(select(QueueSample).where(QueueSample.at >= since).order_by(QueueSample.at)))


@dataclass(frozen=True)
class LatencyBucket:
    start: datetime
    p50: float
    p99: float
    count: int


# Every committed step's wait from enqueue to a worker's claim, as its step span records it: the figure
# steprun_queue_latency_seconds observes on /metrics (shared/engine/trace.py), read back over the last hour.
WAIT = "((attributes->>'queue_latency_ms')::float / 1000)"
STEP_WAITS = ("FROM trace_spans WHERE kind = 'step' AND started_at >= :since "
              "AND attributes->>'queue_latency_ms' IS NOT NULL")
LATENCY_SQL = f"""
SELECT to_timestamp(floor(EXTRACT(EPOCH FROM started_at) / :bucket) * :bucket) AS bucket,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY {WAIT}) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY {WAIT}) AS p99,
       count(*) AS n
{STEP_WAITS}
GROUP BY 1 ORDER BY 1
"""
OVERALL_SQL = f"""
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY {WAIT}) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY {WAIT}) AS p99,
       count(*) AS n
{STEP_WAITS}
"""


def latency(db: Session, since: datetime, bucket_seconds: int) -> tuple[list[LatencyBucket], LatencyBucket]:
    """Queue latency (enqueue to claim) of the steps committed since ``since``: per bucket, and overall."""
    if db.get_bind().dialect.name == "postgresql":
        params: dict[str, Any] = {"since": since, "bucket": bucket_seconds}
        buckets = [LatencyBucket(aware(r.bucket), float(r.p50), float(r.p99), int(r.n))
                   for r in db.execute(text(LATENCY_SQL), params)]
        o = db.execute(text(OVERALL_SQL), params).one()
        overall = LatencyBucket(since, float(o.p50 or 0.0), float(o.p99 or 0.0), int(o.n))
        return buckets, overall
    return _latency_portable(db, since, bucket_seconds)


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, as Postgres's percentile_cont."""
    if not values:
        return 0.0
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _latency_portable(db: Session, since: datetime, bucket_seconds: int) -> tuple[list[LatencyBucket], LatencyBucket]:
    grouped: dict[int, list[float]] = {}
    every: list[float] = []
    for started_at, attributes in db.execute(select(TraceSpan.started_at, TraceSpan.attributes).where(
            TraceSpan.kind == "step", TraceSpan.started_at >= since)):
        waited_ms = (attributes or {}).get("queue_latency_ms")
        if waited_ms is None:
            continue
        wait = float(waited_ms) / 1000
        every.append(wait)
        grouped.setdefault(int(aware(started_at).timestamp()) // bucket_seconds, []).append(wait)
    buckets = []
    for key in sorted(grouped):
        values = sorted(grouped[key])
        start = datetime.fromtimestamp(key * bucket_seconds, since.tzinfo)
        buckets.append(LatencyBucket(start, _quantile(values, 0.5), _quantile(values, 0.99), len(values)))
    every.sort()
    return buckets, LatencyBucket(since, _quantile(every, 0.5), _quantile(every, 0.99), len(every))


def retries(db: Session, since: datetime) -> int:
    """Steps committed by a retry (attempt > 1) since ``since``: what steprun_step_retries_total counts,
    less the retries that died themselves (a dead attempt commits no span)."""
    return int(db.scalar(select(func.count()).select_from(TraceSpan).where(
        TraceSpan.kind == "step", TraceSpan.attempt > 1, TraceSpan.started_at >= since)) or 0)
