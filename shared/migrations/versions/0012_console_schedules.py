"""the console reads a tenant's schedules and webhooks

Migration 0011 gave the tenant admin (``steprun.admin_tenant_id``) a SELECT-only
policy on every table that carries a tenant and a user. The webhook endpoints
and deliveries of 0008 belong to a tenant and no user, so 0011 left them out;
this adds the same read policy to them, and (again, idempotently) to
``schedules`` and ``webhook_events``, so the console's Schedules and Webhooks
pages hold whatever order the migrations ran in. Permissive and SELECT-only:
writes still need 0008's tenant-wide (or principal, or system) policy.

Revision ID: 0012
Revises: 0006
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0012"
down_revision: Union[str, Sequence[str], None] = "0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# 0011's expression (migrations must not import each other).
ADMIN = "(tenant_id = NULLIF(current_setting('steprun.admin_tenant_id', true), ''))"
# Tables 0011's user-data sweep covers already when 0008 ran first; re-created here all the same.
USER_TABLES = ("schedules", "webhook_events")
TENANT_TABLES = ("webhook_endpoints", "webhook_deliveries")


def _admin_read(table: str) -> None:
    op.execute(f'DROP POLICY IF EXISTS tenant_admin_read ON "{table}"')
    op.execute(f'CREATE POLICY tenant_admin_read ON "{table}" FOR SELECT USING {ADMIN}')


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in USER_TABLES + TENANT_TABLES:
        _admin_read(table)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # The user tables' policies are 0011's to drop.
    for table in TENANT_TABLES:
        op.execute(f'DROP POLICY IF EXISTS tenant_admin_read ON "{table}"')
