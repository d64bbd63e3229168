"""storage quotas: each session's turn input bytes, and an index for queued-turn counts

``sessions.input_bytes`` is the UTF-8 size of every kept turn input of the
session, added to as each turn is created (under the session row lock the turn
takes anyway) and gone with the session: a user's history quota
(``STEPRUN_QUOTA_USER_HISTORY_BYTES``) sums it over the user's sessions instead
of the user's turns. Existing sessions are back-filled from their turns.

``ix_turns_active_owner`` (partial: queued and running turns only) keeps the
per-user and per-tenant counts of queued turns (each new turn) and of running
turns (each turn's first claim, shared/turns/fairshare.py) to those few rows.

Revision ID: 0015
Revises: 0014
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: Union[str, Sequence[str], None] = "0014"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

ACTIVE = "status IN ('queued', 'in_progress')"


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.add_column("sessions", sa.Column("input_bytes", sa.BigInteger(), nullable=False, server_default="0"))
    size = "octet_length(input)" if postgres else "length(CAST(input AS BLOB))"
    op.execute(f"UPDATE sessions SET input_bytes = COALESCE((SELECT SUM({size}) FROM turns "
               "WHERE turns.session_id = sessions.id), 0)")
    op.create_index("ix_turns_active_owner", "turns", ["tenant_id", "user_id", "status"],
                    postgresql_where=sa.text(ACTIVE), sqlite_where=sa.text(ACTIVE))


def downgrade() -> None:
    op.drop_index("ix_turns_active_owner", table_name="turns")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("input_bytes")
