"""Who a database session acts as: one principal, or the narrow system path.

A principal sees that user's rows only. A :class:`Tenant` scope (a service key
on a tenant-wide route: webhook endpoints) sees its tenant's tenant-wide rows and
no user's. A :class:`TenantAdmin` (the console's operator) reads every row of one
tenant and writes none. :data:`SYSTEM` is the cross-tenant path of the worker's
claim and the scheduler's sweeps; nothing else uses it. A session with no scope
sees no user data at all (row-level security).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Union


@dataclass(frozen=True)
class Principal:
    """The (tenant, user) a request acts as."""

    tenant_id: str
    user_id: str


@dataclass(frozen=True)
class Tenant:
    """A whole tenant, acting as no user: for tenant-wide rows (webhook endpoints and their deliveries)."""

    tenant_id: str
    # No user: the principal policies match nothing, the tenant-wide ones match this tenant.
    user_id: str = ""


@dataclass(frozen=True)
class TenantAdmin:
    """A tenant's operator: reads all of that tenant's rows (migration 0011's policy), writes none.

    The console acts *as the turn's user* (a :class:`Principal`) for a change such
    as an approval, so writes still pass the principal policy.
    """

    tenant_id: str


class System:
    """The system scope's type: one instance, :data:`SYSTEM`."""

    _instance: System | None = None

    def __new__(cls) -> System:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "SYSTEM"


SYSTEM: Final = System()

# What a unit of work may be scoped to. ``None`` (no scope) sees no user data.
Scope = Union[Principal, Tenant, TenantAdmin, System]
