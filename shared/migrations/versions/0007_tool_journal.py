"""the tool-call journal, recorded model responses, and usage counters

- ``model_calls``: the model's response for each step, recorded before its tools
  run, so a retried attempt reuses it (same tool calls, same idempotency keys);
- ``tool_calls``: one row per tool call, committed before the tool runs, its
  result recorded as soon as it returns;
- ``usage_counters``: tokens, model calls and tool calls per principal per UTC
  day and month, which the budgets are checked against.

All three hold user data (tenant_id, user_id): each gets the FORCEd principal
policy of migration 0004.

Revision ID: 0007
Revises: 0004
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: Union[str, Sequence[str], None] = "0011"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TABLES = ("model_calls", "tool_calls", "usage_counters")

# The policy of migration 0004, the same words (a revision file cannot be imported by name).
PRINCIPAL = (
    "(tenant_id = NULLIF(current_setting('steprun.tenant_id', true), '') "
    "AND user_id = NULLIF(current_setting('steprun.user_id', true), ''))"
)
SYSTEM = "(current_setting('steprun.system', true) = 'on')"


def protect(table: str) -> None:
    op.execute(f'ALTER TABLE "{table}" ENABLE ROW LEVEL SECURITY')
    op.execute(f'ALTER TABLE "{table}" FORCE ROW LEVEL SECURITY')
    op.execute(f'DROP POLICY IF EXISTS principal_isolation ON "{table}"')
    op.execute(
        f'CREATE POLICY principal_isolation ON "{table}" USING ({PRINCIPAL} OR {SYSTEM}) '
        f"WITH CHECK ({PRINCIPAL} OR {SYSTEM})"
    )


def upgrade() -> None:
    op.create_table(
        "model_calls",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("turn_id", sa.String(40), sa.ForeignKey("turns.id", ondelete="CASCADE",
                                                           name="fk_model_calls_turn_id_turns"), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.Column("response", JSON, nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("turn_id", "step", name="uq_model_calls_step"),
        sa.PrimaryKeyConstraint("id", name="pk_model_calls"),
    )
    op.create_index("ix_model_calls_inflight", "model_calls", ["tenant_id", "status"])
    op.create_table(
        "tool_calls",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("turn_id", sa.String(40), sa.ForeignKey("turns.id", ondelete="CASCADE",
                                                           name="fk_tool_calls_turn_id_turns"), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("call_id", sa.String(200), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("idempotency_key", sa.String(400), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("error", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("turn_id", "step", "call_id", name="uq_tool_calls_call"),
        sa.PrimaryKeyConstraint("id", name="pk_tool_calls"),
    )
    op.create_table(
        "usage_counters",
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("model_calls", sa.Integer(), nullable=False),
        sa.Column("tool_calls", sa.Integer(), nullable=False),
        sa.Column("max_call_tokens", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "user_id", "period", "starts_at", name="pk_usage_counters"),
    )
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        protect(table)
    # 0004's default privileges cover tables created later by the same role; grant anyway, in case
    # another role runs this migration.
    op.execute("""
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'steprun_app') THEN
    EXECUTE 'GRANT SELECT, INSERT, UPDATE, DELETE ON model_calls, tool_calls, usage_counters TO steprun_app';
    EXECUTE 'GRANT USAGE, SELECT ON SEQUENCE model_calls_id_seq, tool_calls_id_seq TO steprun_app';
  END IF;
EXCEPTION WHEN insufficient_privilege THEN NULL;
END $$;
""")


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)
