"""The scheduler's share of storage: expired memory removed, sweep results counted."""
from __future__ import annotations

import logging
import time
from typing import Any

from shared.auth.principal import SYSTEM
from shared.db import unit_of_work
from shared.metrics import LEASE_EXPIRIES
from shared.runtime import Runtime
from shared.storage import memory

log = logging.getLogger(__name__)


def observe_sweep(report: Any) -> None:
    """Count what a recovery sweep found (lease expiries: workers presumed dead)."""
    LEASE_EXPIRIES.inc(getattr(report, "expired_leases", 0) or 0)


class StorageSweep:
    """Purges expired memory items at most once per ``lifecycle_interval`` (reads hide them before that)."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self._next = 0.0

    def run_if_due(self) -> int:
        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + float(getattr(self.rt.settings, "lifecycle_interval", 60.0))
        # Every user's expired items at once: the sweep is a system path, like lease recovery.
        with unit_of_work(self.rt.sessions, SYSTEM) as db:
            purged = memory.purge_expired(db)
        if purged:
            log.info("storage sweep: %s expired memory items removed", purged)
        return purged
