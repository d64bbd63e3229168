"""durable events: the events that change what a client believes, kept with their commit

- ``events``: step.completed, tool.call, tool.result, turn.requires_action and the
  terminal turn events, written in the transaction that made them true and
  republished to the Redis event log whenever it may have lost them;
- ``sessions.event_cursor``: the highest cursor the session's log is known to have
  issued, so a log restored from an older snapshot never reuses a cursor.

Revision ID: 0006
Revises: 0004
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: Union[str, Sequence[str], None] = "0007"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# As in 0004_isolation.
PRINCIPAL = (
    "(tenant_id = NULLIF(current_setting('steprun.tenant_id', true), '') "
    "AND user_id = NULLIF(current_setting('steprun.user_id', true), ''))"
)
SYSTEM = "(current_setting('steprun.system', true) = 'on')"


def upgrade() -> None:
    op.add_column("sessions", sa.Column("event_cursor", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_table(
        "events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("session_id", sa.String(40), sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("turn_id", sa.String(40), nullable=True),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_events_session", "events", ["session_id", "created_at"])
    op.create_index("ix_events_unpublished", "events", ["created_at"],
                    postgresql_where=sa.text("published_at IS NULL"), sqlite_where=sa.text("published_at IS NULL"))
    if op.get_bind().dialect.name == "postgresql":
        # Row-level security like every table of user data (0004's policy; its default privileges grant
        # the application role access to new tables).
        op.execute('ALTER TABLE "events" ENABLE ROW LEVEL SECURITY')
        op.execute('ALTER TABLE "events" FORCE ROW LEVEL SECURITY')
        op.execute(f'CREATE POLICY principal_isolation ON "events" USING ({PRINCIPAL} OR {SYSTEM}) '
                   f"WITH CHECK ({PRINCIPAL} OR {SYSTEM})")


def downgrade() -> None:
    op.drop_index("ix_events_unpublished", table_name="events")
    op.drop_index("ix_events_session", table_name="events")
    op.drop_table("events")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("event_cursor")
