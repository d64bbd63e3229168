"""schedules, delayed turns, and the webhook outbox

- ``turns.scheduled_at``: a delayed turn waits queued (not the session's active
  turn) until then; ``turns.schedule_id``: the schedule that started it;
- ``schedules``: recurring turns of one principal (cron or every N seconds);
- ``webhook_endpoints``: a tenant's endpoints, with their signing secrets;
- ``webhook_events``: the outbox, one row per turn event, written in the
  transaction that changes the turn's state (deleted once fanned out);
- ``webhook_deliveries``: one event for one endpoint, with its retry state.

Row-level security, forced, as migration 0004 does for every table:
``schedules`` and ``webhook_events`` carry the principal (tenant and user) and
get the same principal policy; ``webhook_endpoints`` and ``webhook_deliveries``
belong to a tenant and are visible only to a tenant-wide transaction (tenant
set, no user: a service key on the endpoint routes) or the system path.

Revision ID: 0008
Revises: 0004
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# The same expressions as 0004's (migrations must not import each other).
PRINCIPAL = (
    "(tenant_id = NULLIF(current_setting('steprun.tenant_id', true), '') "
    "AND user_id = NULLIF(current_setting('steprun.user_id', true), ''))"
)
TENANT_WIDE = (
    "(tenant_id = NULLIF(current_setting('steprun.tenant_id', true), '') "
    "AND NULLIF(current_setting('steprun.user_id', true), '') IS NULL)"
)
SYSTEM = "(current_setting('steprun.system', true) = 'on')"
PRINCIPAL_TABLES = ("schedules", "webhook_events")
TENANT_TABLES = ("webhook_endpoints", "webhook_deliveries")


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _protect(table: str, rule: str) -> None:
    op.execute(f'ALTER TABLE "{table}" ENABLE ROW LEVEL SECURITY')
    op.execute(f'ALTER TABLE "{table}" FORCE ROW LEVEL SECURITY')
    op.execute(f'DROP POLICY IF EXISTS principal_isolation ON "{table}"')
    op.execute(f'CREATE POLICY principal_isolation ON "{table}" USING ({rule} OR {SYSTEM}) '
               f"WITH CHECK ({rule} OR {SYSTEM})")


def upgrade() -> None:
    op.add_column("turns", _ts("scheduled_at"))
    op.add_column("turns", sa.Column("schedule_id", sa.String(40), nullable=True))
    op.create_index("ix_turns_scheduled", "turns", ["scheduled_at"],
                    postgresql_where=sa.text("status = 'queued'"), sqlite_where=sa.text("status = 'queued'"))
    op.create_index("ix_turns_schedule", "turns", ["schedule_id", "created_at"])

    op.create_table(
        "schedules",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("agent", sa.String(200), nullable=False),
        sa.Column("input", sa.Text(), nullable=False),
        sa.Column("cron", sa.String(200), nullable=True),
        sa.Column("every_seconds", sa.Integer(), nullable=True),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(40), nullable=True),
        sa.Column("metadata", _json(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        _ts("next_run_at", nullable=False),
        _ts("last_run_at"),
        sa.Column("run_count", sa.Integer(), nullable=False),
        sa.Column("last_error", _json(), nullable=True),
        _ts("created_at", nullable=False),
        _ts("updated_at", nullable=False),
    )
    op.create_index("ix_schedules_owner", "schedules", ["tenant_id", "user_id", "created_at"])
    op.create_index("ix_schedules_due", "schedules", ["next_run_at"])

    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("event_types", _json(), nullable=False),
        sa.Column("signing_secret", sa.String(100), nullable=False),
        sa.Column("previous_secret", sa.String(100), nullable=True),
        _ts("previous_secret_expires_at"),
        _ts("created_at", nullable=False),
        _ts("updated_at", nullable=False),
    )
    op.create_index("ix_webhook_endpoints_tenant", "webhook_endpoints", ["tenant_id", "created_at"])

    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("turn_id", sa.String(40), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        _ts("created_at", nullable=False),
    )
    op.create_index("ix_webhook_events_created", "webhook_events", ["created_at"])

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("endpoint_id", sa.String(40),
                  sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE",
                                name="fk_webhook_deliveries_endpoint_id_webhook_endpoints"), nullable=False),
        sa.Column("event_id", sa.String(40), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("next_attempt_at", nullable=False),
        _ts("retry_until", nullable=False),
        _ts("last_attempt_at"),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        _ts("created_at", nullable=False),
        _ts("delivered_at"),
        sa.UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_event"),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"])
    op.create_index("ix_webhook_deliveries_endpoint", "webhook_deliveries", ["endpoint_id", "created_at"])

    if op.get_bind().dialect.name == "postgresql":
        for table in PRINCIPAL_TABLES:
            _protect(table, PRINCIPAL)
        for table in TENANT_TABLES:
            _protect(table, TENANT_WIDE)


def downgrade() -> None:
    for table in ("webhook_deliveries", "webhook_events", "webhook_endpoints", "schedules"):
        op.drop_table(table)
    op.drop_index("ix_turns_schedule", table_name="turns")
    op.drop_index("ix_turns_scheduled", table_name="turns")
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("schedule_id")
        batch.drop_column("scheduled_at")
