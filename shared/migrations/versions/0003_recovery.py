"""recovery and long-lived turns

Adds what the scheduler needs to end turns on time and explain retries:

- ``turns.deadline_at``: the turn's wall-time deadline (STEPRUN_TURN_TIME_LIMIT),
  set when it first starts and pushed back by the time it spends paused;
- ``turns.paused_at`` / ``turns.action_expires_at``: when a turn entered
  ``requires_action`` and when the pause expires (STEPRUN_ACTION_TIMEOUT_SECONDS);
- ``turns.retry_reason``: why the current step's last attempt did not finish,
  shown in ``step.retrying`` and in the error of a turn that ran out of attempts;
- an index on ``sessions.updated_at`` for the idle-session expiry sweep.

Revision ID: 0003
Revises: 0002
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Plain nullable ADD COLUMNs: instant on Postgres, and supported by SQLite (embedded mode).
    op.add_column("turns", sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("turns", sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("turns", sa.Column("action_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("turns", sa.Column("retry_reason", sa.Text(), nullable=True))
    op.create_index("ix_sessions_updated", "sessions", ["updated_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_sessions_updated", table_name="sessions")
    with op.batch_alter_table("turns") as batch:  # batch: SQLite cannot DROP COLUMN in older versions
        batch.drop_column("retry_reason")
        batch.drop_column("action_expires_at")
        batch.drop_column("paused_at")
        batch.drop_column("deadline_at")
