"""the console: admin keys, a tenant-wide read scope, worker heartbeats, queue samples

- ``api_keys.admin``: a tenant admin key signs in to /console (``steprun keys
  create --tenant T --admin``); the /v1 API refuses it.
- A second, SELECT-only policy on every user-data table: a transaction that set
  ``steprun.admin_tenant_id`` (shared.auth.principal.TenantAdmin) reads every
  row of that one tenant. Policies are permissive, so this widens reads only;
  writes still need the principal (or system) policy of 0004. A table added by
  a later migration calls :func:`admin_read` next to 0004's ``protect``.
- ``worker_heartbeats``: one row per worker process, renewed every
  STEPRUN_WORKER_BEAT_SECONDS (the console's "workers alive").
- ``queue_samples``: the queue's figures, sampled by the scheduler, so the
  console can draw the last hour.

Revision ID: 0011
Revises: 0004
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: Union[str, Sequence[str], None] = "0008"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

NOT_USER_DATA = {"api_keys", "tenants", "alembic_version"}
ADMIN = "(tenant_id = NULLIF(current_setting('steprun.admin_tenant_id', true), ''))"


def user_data_tables(bind) -> list[str]:  # noqa: ANN001
    rows = bind.execute(sa.text(
        "SELECT table_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND column_name IN ('tenant_id', 'user_id') GROUP BY table_name HAVING count(*) = 2"
    )).scalars().all()
    return sorted(t for t in rows if t not in NOT_USER_DATA)


def admin_read(table: str) -> None:
    """The tenant admin's read-only policy on one user-data table."""
    op.execute(f'DROP POLICY IF EXISTS tenant_admin_read ON "{table}"')
    op.execute(f'CREATE POLICY tenant_admin_read ON "{table}" FOR SELECT USING {ADMIN}')


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("admin", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "worker_heartbeats",
        sa.Column("worker_id", sa.String(200), primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "queue_samples",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("waiting", sa.Integer(), nullable=False),
        sa.Column("running", sa.Integer(), nullable=False),
        sa.Column("expired_leases", sa.Integer(), nullable=False),
        sa.Column("oldest_wait_seconds", sa.Float(), nullable=False),
        # Lease expiries the sampling scheduler's sweeps found since its previous sample.
        sa.Column("lease_expiries", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index("ix_queue_samples_at", "queue_samples", ["at"])
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for table in user_data_tables(bind):
        admin_read(table)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for table in user_data_tables(bind):
            op.execute(f'DROP POLICY IF EXISTS tenant_admin_read ON "{table}"')
    op.drop_index("ix_queue_samples_at", table_name="queue_samples")
    op.drop_table("queue_samples")
    op.drop_table("worker_heartbeats")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("admin")
