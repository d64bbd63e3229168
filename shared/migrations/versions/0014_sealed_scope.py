"""row-level security reads a scope the application login cannot forge

Until now the policies compared rows with settings (``steprun.tenant_id``,
``steprun.user_id``, ``steprun.system``...) that any statement on the
application's connection could change with ``set_config``. From here:

- The application connects as its own login (``steprun_app``, see
  shared/migrate.py): it owns nothing, is a member of nothing, may not create
  temporary objects, and cannot read or write ``api_keys``, ``tenants``,
  ``alembic_version`` or the fleet tables.
- At connect, ``steprun_open()`` (SECURITY DEFINER, once per connection) creates
  this connection's private state -- a random key, the last number entered, the
  entered scope's fingerprint -- as temporary objects owned by the tables'
  owner, and hands the key to the application once.
- Each transaction begins with ``steprun_enter(n, scope, mac)``: the scope, its
  number ``n`` (strictly greater than the last one accepted on this connection;
  kept in a sequence, so a ROLLBACK does not bring an old number back) and
  their HMAC-SHA256 under the connection's key. A forged, altered or replayed
  scope is refused; an accepted one is put in a transaction-local setting and
  its 128-bit fingerprint in two sequences (no row is written: no transaction
  id, no commit flush).
- The policies read the scope through ``steprun_scope(field)``, once per
  statement (an InitPlan): the setting counts only if it is the very token whose
  fingerprint was entered last, so a ``set_config`` by hand gives no scope.
- The system path (claim, sweeps, key lookup, migrations) connects as the
  tables' owner, which the policies no longer bind (NO FORCE); the app login can
  never be the system path.
- Tenant-wide documents are read-only to users: writing one takes a scope entered
  as a service key.

A table added later gets the same words: ENABLE (not FORCE) row level security
and policies that read ``(SELECT steprun_scope('tenant_id'))``,
``(SELECT steprun_scope('user_id'))`` (and ``'admin_tenant_id'``, ``'service'``)
where 0004 read ``current_setting('steprun.…', true)``; there is no system
setting any more. ``steprun migrate`` refuses a policy that reads a setting and
a FORCEd table (shared/migrate.py).

Revision ID: 0014
Revises: 0012
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: Union[str, Sequence[str], None] = "0012"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

SETTINGS = ("tenant_id", "user_id", "admin_tenant_id")
SYSTEM_OLD = "(current_setting('steprun.system'::text, true) = 'on'::text)"
TENANT_ROWS = "((user_id IS NULL) AND ((tenant_id)::text = NULLIF((SELECT steprun_scope('tenant_id')), ''::text)))"
TENANT_ROWS_OLD = "(user_id IS NULL AND tenant_id = NULLIF(current_setting('steprun.tenant_id', true), ''))"
SHARED_TABLES = ("knowledge_documents", "knowledge_chunks")

FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION steprun_open() RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  k bytea := decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex');
  ki bytea := '\x'::bytea;
  ko bytea := '\x'::bytea;
  b int;
BEGIN
  -- Once per connection: a second call (after DISCARD TEMP, say) would hand out a fresh key.
  -- The application login may not create temporary objects, so a temp schema means we were here.
  IF pg_my_temp_schema() <> 0 THEN
    RAISE EXCEPTION 'steprun: this connection has already opened its scope' USING ERRCODE = '42501';
  END IF;
  FOR i IN 0..63 LOOP
    b := CASE WHEN i < length(k) THEN get_byte(k, i) ELSE 0 END;
    ki := ki || set_byte('\x00'::bytea, 0, b # 54);
    ko := ko || set_byte('\x00'::bytea, 0, b # 92);
  END LOOP;
  CREATE TEMP TABLE steprun_scope_key (ki bytea NOT NULL, ko bytea NOT NULL);
  INSERT INTO pg_temp.steprun_scope_key VALUES (ki, ko);
  -- Sequences, not rows: setting them writes no heap tuple (no transaction id, no commit flush) and a
  -- ROLLBACK does not undo them. seq: the last number entered; fp_a, fp_b: the entered scope's fingerprint.
  CREATE TEMP SEQUENCE steprun_scope_seq MINVALUE 0 START 0;
  CREATE TEMP SEQUENCE steprun_scope_fp_a MINVALUE -9223372036854775808 START 0;
  CREATE TEMP SEQUENCE steprun_scope_fp_b MINVALUE -9223372036854775808 START 0;
  -- Readable (not settable) by the login: steprun_scope() runs as it. Nothing here is secret but the key.
  GRANT SELECT ON SEQUENCE pg_temp.steprun_scope_seq, pg_temp.steprun_scope_fp_a, pg_temp.steprun_scope_fp_b TO PUBLIC;
  RETURN encode(k, 'hex');
END $fn$;

CREATE OR REPLACE FUNCTION steprun_enter(n bigint, scope text, mac text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  st record;
  token text := n::text || chr(31) || scope;
  h bytea;
BEGIN
  SELECT ki, ko INTO st FROM pg_temp.steprun_scope_key;
  IF NOT FOUND OR mac IS NULL OR n IS NULL OR scope IS NULL OR sha256(sha256(st.ko || sha256(st.ki ||
      convert_to(token, 'UTF8')))) <> sha256(decode(mac, 'hex')) THEN
    RAISE EXCEPTION 'steprun: the scope is not signed by this connection''s key' USING ERRCODE = '42501';
  END IF;
  IF n <= coalesce(pg_sequence_last_value('pg_temp.steprun_scope_seq'), 0) THEN
    RAISE EXCEPTION 'steprun: the scope was already used on this connection' USING ERRCODE = '42501';
  END IF;
  IF array_length(string_to_array(scope, chr(31)), 1) IS DISTINCT FROM 4 THEN
    RAISE EXCEPTION 'steprun: a scope has four fields' USING ERRCODE = '22023';
  END IF;
  h := sha256(convert_to(token, 'UTF8'));
  PERFORM setval('pg_temp.steprun_scope_seq', n),
          setval('pg_temp.steprun_scope_fp_a', ('x' || encode(substr(h, 1, 8), 'hex'))::bit(64)::bigint),
          setval('pg_temp.steprun_scope_fp_b', ('x' || encode(substr(h, 9, 8), 'hex'))::bit(64)::bigint);
  -- Transaction-local: gone at COMMIT or ROLLBACK. Anyone may set it; only the entered token matches fp_a/fp_b.
  PERFORM set_config('steprun.scope', token, true);
END $fn$;

-- What the policies read, once per statement (an InitPlan): a field of the token entered last on this connection
-- and set in this transaction, or '' (no scope). A token set by hand matches only if it is that very token.
-- Not SECURITY DEFINER and no SET clause, so it stays cheap (~7 us a call): it reads only what the login may
-- read (the fingerprint sequences are granted to it at open), and the login can create no object anywhere
-- (no TEMPORARY, no CREATE on a schema; checked at each connect) to shadow what the body calls.
CREATE OR REPLACE FUNCTION steprun_scope(field text) RETURNS text
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
  t text := coalesce(current_setting('steprun.scope', true), '');
  h bytea := sha256(convert_to(t, 'UTF8'));
BEGIN
  IF ('x' || encode(substr(h, 1, 8), 'hex'))::bit(64)::bigint
       = pg_sequence_last_value(to_regclass('pg_temp.steprun_scope_fp_a'))
     AND ('x' || encode(substr(h, 9, 8), 'hex'))::bit(64)::bigint
       = pg_sequence_last_value(to_regclass('pg_temp.steprun_scope_fp_b')) THEN
    RETURN split_part(t, chr(31), CASE field WHEN 'tenant_id' THEN 2 WHEN 'user_id' THEN 3
                                             WHEN 'admin_tenant_id' THEN 4 WHEN 'service' THEN 5 END);
  END IF;
  RETURN '';
END $fn$;

REVOKE ALL ON FUNCTION steprun_open() FROM PUBLIC;
REVOKE ALL ON FUNCTION steprun_enter(bigint, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION steprun_scope(text) FROM PUBLIC;
"""


def _policies(bind) -> list:  # noqa: ANN001
    return bind.execute(sa.text(
        "SELECT tablename, policyname, cmd, qual, with_check FROM pg_policies WHERE schemaname = current_schema() "
        "AND (qual LIKE '%steprun.%' OR with_check LIKE '%steprun.%')")).all()


def _sealed(expr: str | None) -> str | None:
    if expr is None:
        return None
    expr = expr.replace(SYSTEM_OLD, "false")
    for name in SETTINGS:
        expr = expr.replace(f"current_setting('steprun.{name}'::text, true)", f"(SELECT steprun_scope('{name}'))")
    return expr


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute(FUNCTIONS)
    # Temporary objects are for the owner's functions only (steprun_open): without this the app login could
    # drop the connection's state (DISCARD TEMP) and put an impostor in its place.
    op.execute("""
DO $$
BEGIN
  EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
  EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO %I', current_database(), current_user);
EXCEPTION WHEN insufficient_privilege THEN
  RAISE EXCEPTION 'steprun: the migrating login must own the database (REVOKE TEMPORARY ... FROM PUBLIC)';
END $$;
""")
    for table, name, cmd, qual, check in _policies(bind):
        if name == "tenant_shared":
            continue  # rewritten below: read-only to users
        parts = [f'ALTER POLICY "{name}" ON "{table}"']
        if qual is not None:
            parts.append(f"USING ({_sealed(qual)})")
        if check is not None:
            parts.append(f"WITH CHECK ({_sealed(check)})")
        op.execute(" ".join(parts))
    for table in SHARED_TABLES:
        op.execute(f'DROP POLICY IF EXISTS tenant_shared ON "{table}"')
        op.execute(f'CREATE POLICY tenant_shared ON "{table}" FOR SELECT USING {TENANT_ROWS}')
        service = f"({TENANT_ROWS} AND ((SELECT steprun_scope('service')) = 'on'::text))"
        op.execute(f'CREATE POLICY tenant_shared_service ON "{table}" USING {service} WITH CHECK {service}')
    left = _policies(bind)
    if left:
        raise RuntimeError(f"policies still reading settings: {[(t, n) for t, n, *_ in left]}")
    # The owner is the system path now (its own connection): the policies bind everyone else.
    for (table,) in bind.execute(sa.text(
            "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
            "AND relkind = 'r' AND relforcerowsecurity")).all():
        op.execute(f'ALTER TABLE "{table}" NO FORCE ROW LEVEL SECURITY')


def _unsealed(expr: str | None) -> str | None:
    if expr is None:
        return None
    for name in SETTINGS:
        expr = expr.replace(f"( SELECT steprun_scope('{name}'::text) AS steprun_scope)",
                            f"current_setting('steprun.{name}', true)")
    return expr


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for table in SHARED_TABLES:
        op.execute(f'DROP POLICY IF EXISTS tenant_shared_service ON "{table}"')
        op.execute(f'DROP POLICY IF EXISTS tenant_shared ON "{table}"')
        op.execute(f"CREATE POLICY tenant_shared ON {table} USING {TENANT_ROWS_OLD} WITH CHECK {TENANT_ROWS_OLD}")
    system = "(current_setting('steprun.system', true) = 'on')"
    for table, name, _cmd, qual, check in bind.execute(sa.text(
            "SELECT tablename, policyname, cmd, qual, with_check FROM pg_policies "
            "WHERE schemaname = current_schema() AND qual LIKE '%steprun_scope%'")).all():
        parts = [f'ALTER POLICY "{name}" ON "{table}"']
        if qual is not None:
            unsealed = _unsealed(qual)
            parts.append(f"USING ({unsealed} OR {system})" if name == "principal_isolation" else f"USING ({unsealed})")
        if check is not None:
            parts.append(f"WITH CHECK ({_unsealed(check)} OR {system})")
        op.execute(" ".join(parts))
    for (table,) in bind.execute(sa.text(
            "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
            "AND relkind = 'r' AND relrowsecurity")).all():
        op.execute(f'ALTER TABLE "{table}" FORCE ROW LEVEL SECURITY')
    op.execute("DROP FUNCTION IF EXISTS steprun_scope(text)")
    op.execute("DROP FUNCTION IF EXISTS steprun_enter(bigint, text, text)")
    op.execute("DROP FUNCTION IF EXISTS steprun_open()")
    op.execute("""
DO $$ BEGIN EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
EXCEPTION WHEN insufficient_privilege THEN NULL; END $$;
""")
