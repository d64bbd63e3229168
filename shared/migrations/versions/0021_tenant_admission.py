"""a new turn's tenant-wide limits read in the turn's own transaction

Creating a turn checks two limits that add up every user of the tenant: the
tenant's queued turns (STEPRUN_MAX_QUEUED_TURNS_PER_TENANT) and, when set, the
bytes of input its sessions keep (STEPRUN_QUOTA_TENANT_HISTORY_BYTES). The
application login cannot read other users' rows, so these ran in a
transaction of their own on the system path before the turn's, one more per
``POST …/turns``. ``steprun_tenant_admission(tenant, queued, history)`` (SECURITY
DEFINER, owned by the tables' owner) returns those two totals, and nothing else,
for the tenant of the scope the caller's transaction entered (steprun_scope, so
a forged tenant id is refused); the tables' owner (the system path, e.g. a
scheduled turn) may name any tenant. ``queued``/``history`` false: that total
is not counted (NULL).

Revision ID: 0021
Revises: 0020
"""
from typing import Sequence, Union

from alembic import op
from sqlalchemy import text

revision: str = "0021"
down_revision: Union[str, Sequence[str], None] = "0020"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

FUNCTION = r"""
CREATE OR REPLACE FUNCTION steprun_tenant_admission(tenant text, queued boolean, history boolean,
                                                    OUT tenant_queued bigint, OUT tenant_history bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, {schema}, pg_temp AS $fn$
BEGIN
  -- The owner's own login (the system path) may ask for any tenant; the application login only for the
  -- tenant its signed scope entered in this transaction.
  IF session_user <> current_user AND tenant IS DISTINCT FROM NULLIF(steprun_scope('tenant_id'), '') THEN
    RAISE EXCEPTION 'steprun: a tenant''s totals are for its own scope only' USING ERRCODE = '42501';
  END IF;
  IF queued THEN
    SELECT count(*) INTO tenant_queued FROM turns t WHERE t.tenant_id = tenant AND t.status = 'queued';
  END IF;
  IF history THEN
    SELECT coalesce(sum(s.input_bytes), 0) INTO tenant_history FROM sessions s WHERE s.tenant_id = tenant;
  END IF;
END $fn$;
REVOKE ALL ON FUNCTION steprun_tenant_admission(text, boolean, boolean) FROM PUBLIC;
"""


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return  # no row-level security there: the totals are plain subqueries
    schema = bind.execute(text("SELECT quote_ident(current_schema())")).scalar_one()
    op.execute(FUNCTION.replace("{schema}", schema))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS steprun_tenant_admission(text, boolean, boolean)")
