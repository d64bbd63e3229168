"""The scheduler's share of storage: expired memory removed, sweep results counted."""
from __future__ import annotations

from typing import Any

from shared.auth.principal import SYSTEM
from shared.db import unit_of_work
from shared.metrics import LEASE_EXPIRIES
from shared.runtime import Runtime
from shared.storage import memory


def observe_sweep(report: Any) -> None:
    """Count what a recovery sweep found (lease expiries: workers presumed dead)."""
    LEASE_EXPIRIES.inc(getattr(report, "expired_leases", 0) or 0)


def purge_expired_memory(rt: Runtime) -> int:
    """Every user's expired memory items at once (reads hide them before this runs): a system path."""
    with unit_of_work(rt.sessions, SYSTEM) as db:
        return memory.purge_expired(db)
