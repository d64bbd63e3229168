"""attempts that died, counted apart from attempts that were handed back

``turns.step_attempt`` counts every claim of the current step (what ``step.retrying``
and the client rule go by). ``turns.step_failures`` counts only the attempts of it
that died or failed: a lease that lapsed (worker killed, crashed or stalled) and a
step handed back after a transient model error. A graceful hand-back (a worker
shutting down) does not count. STEPRUN_MAX_ATTEMPTS is checked against it.

Revision ID: 0020
Revises: 0015
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: Union[str, Sequence[str], None] = "0015"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # A constant default: instant on Postgres (no table rewrite), and supported by SQLite.
    op.add_column("turns", sa.Column("step_failures", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("turns") as batch:  # batch: SQLite cannot DROP COLUMN in older versions
        batch.drop_column("step_failures")
