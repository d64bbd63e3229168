"""The scheduler's periodic jobs, as one table: what runs, how often, and what it logs.

Each job is a system path (it acts for all tenants) and is safe to run from two
schedulers at once (shared/turns/housekeeping.py, shared/turns/recovery.py,
shared/schedules/firing.py, shared/webhooks/delivery.py). ``interval`` reads the
settings, so a job's period is whatever the process was configured with
(STEPRUN_SWEEP_INTERVAL, STEPRUN_LIFECYCLE_INTERVAL, STEPRUN_SCHEDULE_POLL_SECONDS,
STEPRUN_WEBHOOK_POLL_SECONDS). Jobs of different ``lane``s run in their own
threads, so a webhook receiver that takes its time never delays a scheduled turn
or a recovery sweep.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from shared.fleet import record_sample
from shared.models import QueueSample
from shared.runtime import Runtime
from shared.schedules.firing import FiringReport, fire_due
from shared.settings import Settings
from shared.storage.sweep import observe_sweep, purge_expired_memory
from shared.turns.housekeeping import HousekeepingReport, run_housekeeping
from shared.turns.recovery import SweepReport, sweep
from shared.webhooks.delivery import DeliveryReport, deliver_webhooks, purge_deliveries

R = TypeVar("R")


@dataclass(frozen=True)
class Job(Generic[R]):
    """One periodic job."""

    name: str
    # Seconds from the end of one run to the next.
    interval: Callable[[Settings], float]
    run: Callable[[Runtime], R]
    # The line to log about a run's report, or None when the run did nothing worth a line.
    describe: Callable[[R], str | None]
    # Jobs of one lane run one after another in one thread; lanes run side by side.
    lane: str = "sweeps"


# Lease expiries this process's sweeps found since its last queue sample (the console's chart shows them).
_unsampled_expiries = 0


def recover(rt: Runtime) -> SweepReport:
    """Lease recovery, lost-task re-enqueue and expired pauses (every sweep), with the lease expiries counted."""
    global _unsampled_expiries
    report = sweep(rt)
    observe_sweep(report)
    _unsampled_expiries += report.expired_leases
    return report


def sample_queue(rt: Runtime) -> QueueSample:
    """The queue's figures now, kept a day for the console's last-hour chart (shared/fleet.py)."""
    global _unsampled_expiries
    expiries, _unsampled_expiries = _unsampled_expiries, 0
    try:
        return record_sample(rt, expiries)
    except Exception:
        _unsampled_expiries += expiries  # counted again with the next sample
        raise




def _describe_sweep(report: SweepReport) -> str | None:
    return f"sweep: {report}" if report else None


def _describe_purge(purged: int) -> str | None:
    return f"storage sweep: {purged} expired memory items removed" if purged else None


def _describe_housekeeping(report: HousekeepingReport) -> str | None:
    return f"housekeeping: {report}" if report.sessions_deleted or report.checkpoints_pruned else None


def _describe_firing(report: FiringReport) -> str | None:
    return f"schedules: {report}" if report else None


def _describe_webhooks(report: DeliveryReport) -> str | None:
    return f"webhooks: {report}" if report.failed or report.retrying else None


def _describe_webhook_purge(purged: int) -> str | None:
    return f"webhooks: {purged} old deliveries forgotten" if purged else None


def _describe_sample(_sample: QueueSample) -> str | None:
    return None  # every run writes one row: nothing worth a log line


# Each job typed on its own, so its describe is checked against what its run returns.
SWEEP: Job[SweepReport] = Job("sweep", lambda s: s.sweep_interval, recover, _describe_sweep)
STORAGE: Job[int] = Job("storage", lambda s: s.lifecycle_interval, purge_expired_memory, _describe_purge)
HOUSEKEEPING: Job[HousekeepingReport] = Job("housekeeping", lambda s: s.lifecycle_interval, run_housekeeping,
                                            _describe_housekeeping)
FIRING: Job[FiringReport] = Job("schedules", lambda s: s.schedule_poll_seconds, fire_due, _describe_firing,
                                lane="schedules")
WEBHOOKS: Job[DeliveryReport] = Job("webhooks", lambda s: s.webhook_poll_seconds, deliver_webhooks,
                                    _describe_webhooks, lane="webhooks")
WEBHOOK_RETENTION: Job[int] = Job("webhook-retention", lambda s: s.lifecycle_interval, purge_deliveries,
                                  _describe_webhook_purge, lane="webhooks")

QUEUE_SAMPLE: Job[QueueSample] = Job("queue-sample", lambda s: s.queue_sample_seconds, sample_queue,
                                     _describe_sample)

# In the order they run (within a lane) when several are due at once.
JOBS: tuple[Job[Any], ...] = (SWEEP, STORAGE, HOUSEKEEPING, QUEUE_SAMPLE, FIRING, WEBHOOKS, WEBHOOK_RETENTION)
