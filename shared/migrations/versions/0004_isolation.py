"""row-level security and the application role

Every table that holds user data (it has both tenant_id and user_id) gets a
FORCEd policy: a transaction sees and writes only the rows of the principal it
set with set_config('steprun.tenant_id' / 'steprun.user_id', ..., true), or all
rows when it declared itself the system path (set_config('steprun.system', 'on',
true): the scheduler's sweeps and the worker's claim). A transaction that set
neither sees nothing.

FORCE makes the policies bind the tables' owner too; superusers bypass RLS
whatever is set, so the runtime also drops, per transaction, to the role
created here, which owns nothing (STEPRUN_DB_ROLE). Where the migrating user
may not create roles (managed Postgres), the role is skipped with a notice and
FORCE alone protects a non-superuser owner.

Revision ID: 0004
Revises: 0003
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

APP_ROLE = "steprun_app"
NOT_USER_DATA = {"api_keys", "tenants", "alembic_version"}

PRINCIPAL = (
    "(tenant_id = NULLIF(current_setting('steprun.tenant_id', true), '') "
    "AND user_id = NULLIF(current_setting('steprun.user_id', true), ''))"
)
SYSTEM = "(current_setting('steprun.system', true) = 'on')"


def user_data_tables(bind) -> list[str]:  # noqa: ANN001
    rows = bind.execute(sa.text(
        "SELECT table_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND column_name IN ('tenant_id', 'user_id') GROUP BY table_name HAVING count(*) = 2"
    )).scalars().all()
    return sorted(t for t in rows if t not in NOT_USER_DATA)


def protect(table: str) -> None:
    """Enable, force and write the principal policy on one table (later migrations call this too)."""
    op.execute(f'ALTER TABLE "{table}" ENABLE ROW LEVEL SECURITY')
    op.execute(f'ALTER TABLE "{table}" FORCE ROW LEVEL SECURITY')
    op.execute(f'DROP POLICY IF EXISTS principal_isolation ON "{table}"')
    op.execute(
        f'CREATE POLICY principal_isolation ON "{table}" USING ({PRINCIPAL} OR {SYSTEM}) '
        f"WITH CHECK ({PRINCIPAL} OR {SYSTEM})"
    )


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return  # the embedded SQLite file has one user: the developer running it
    op.execute(f"""
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
    BEGIN
      CREATE ROLE {APP_ROLE} NOLOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT;
    EXCEPTION WHEN duplicate_object THEN NULL;
              WHEN insufficient_privilege THEN RAISE NOTICE 'cannot create role {APP_ROLE}: FORCE alone protects';
    END;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
    BEGIN
      EXECUTE format('GRANT {APP_ROLE} TO %I', current_user);
    EXCEPTION WHEN insufficient_privilege OR invalid_grant_operation THEN NULL;
    END;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO {APP_ROLE}', current_schema());
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO {APP_ROLE}', current_schema());
    EXECUTE format('GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA %I TO {APP_ROLE}', current_schema());
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {APP_ROLE}',
                   current_schema());
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT USAGE, SELECT ON SEQUENCES TO {APP_ROLE}',
                   current_schema());
  END IF;
END $$;
""")
    for table in user_data_tables(bind):
        protect(table)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for table in user_data_tables(bind):
        op.execute(f'DROP POLICY IF EXISTS principal_isolation ON "{table}"')
        op.execute(f'ALTER TABLE "{table}" NO FORCE ROW LEVEL SECURITY')
        op.execute(f'ALTER TABLE "{table}" DISABLE ROW LEVEL SECURITY')
