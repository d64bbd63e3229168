"""Row-level security at the database: a query bug still cannot read or write another user's rows."""
from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.orm import Session

from shared.auth.principal import SYSTEM, Principal
from shared.db import UnsafeLogin, rowcount, set_scope, unit_of_work
from shared.engine.step import build_runtime, run_step
from shared.migrate import ensure_app_login
from shared.runtime import Runtime
from shared.settings import Settings, SettingsError
from shared.storage import knowledge
from shared.turns import service as turns

USER_TABLES_SQL = (
    "SELECT table_name FROM information_schema.columns WHERE table_schema = 'public' "
    "AND column_name IN ('tenant_id', 'user_id') GROUP BY table_name HAVING count(*) = 2"
)


@pytest.fixture(scope="module")
def secure_rt(settings: Settings):  # noqa: ANN201
    rt = build_runtime(settings.replace(db_role="steprun_app"))
    yield rt
    rt.close()


def _raw(rt: Runtime, scope: Principal | str | None, sql: str) -> list:
    """A raw query in a transaction scoped the way the runtime scopes every transaction."""
    with unit_of_work(rt.sessions, scope) as db:
        return db.execute(text(sql)).all()


def _populate(rt: Runtime, who: Principal) -> str:
    with unit_of_work(rt.sessions, who) as db:
        session = turns.create_session(db, rt, who, "math", {"secret": who.user_id})
        turn, _ = turns.create_turn(db, rt, who, session.id, f"add 1 and 2 for {who.user_id}")
        sid, tid = session.id, turn.id
    assert run_step(rt, tid, 0) == "in_progress"
    assert run_step(rt, tid, 1) == "completed"
    return sid


def test_each_user_data_table_shows_only_the_principals_rows(secure_rt: Runtime) -> None:
    a = Principal("t-rls-a", "alice")
    b_same_tenant = Principal("t-rls-a", "bob")
    b_other_tenant = Principal("t-rls-b", "alice")
    _populate(secure_rt, a)
    _populate(secure_rt, b_same_tenant)
    tables = [r[0] for r in _raw(secure_rt, SYSTEM, USER_TABLES_SQL) if r[0] != "api_keys"]
    assert {"sessions", "turns", "checkpoints", "messages"} <= set(tables)

    for table in tables:
        everything = _raw(secure_rt, SYSTEM, f'SELECT tenant_id, user_id FROM "{table}"')
        for b in (b_same_tenant, b_other_tenant):
            seen = _raw(secure_rt, b, f'SELECT tenant_id, user_id FROM "{table}"')  # no WHERE: the "bug"
            assert all((t, u) == (b.tenant_id, b.user_id) for t, u in seen), table
        assert _raw(secure_rt, None, f'SELECT * FROM "{table}"') == [], f"{table} readable with no principal"
        if table in ("sessions", "turns", "messages", "checkpoints"):
            assert any((t, u) == (a.tenant_id, a.user_id) for t, u in everything), table
            mine = _raw(secure_rt, a, f'SELECT tenant_id, user_id FROM "{table}"')
            assert mine and all((t, u) == (a.tenant_id, a.user_id) for t, u in mine), table


def test_writing_as_someone_else_is_refused(secure_rt: Runtime) -> None:
    a = Principal("t-rls-w", "alice")
    sid = _populate(secure_rt, a)
    mallory = Principal("t-rls-w", "mallory")
    with pytest.raises(ProgrammingError, match="row-level security"):
        _raw(secure_rt, mallory,
             "INSERT INTO sessions (id, tenant_id, user_id, agent, metadata, turn_count, created_at, updated_at) "
             "VALUES ('ses_forged', 't-rls-w', 'alice', 'math', '{}', 0, now(), now()) RETURNING id")
    # Updates and deletes of another user's rows silently match nothing.
    with unit_of_work(secure_rt.sessions, mallory) as db:
        assert db.execute(text("UPDATE sessions SET agent = 'x' WHERE id = :id"), {"id": sid}).rowcount == 0
        assert db.execute(text("DELETE FROM messages WHERE session_id = :id"), {"id": sid}).rowcount == 0
    assert len(_raw(secure_rt, a, f"SELECT id FROM messages WHERE session_id = '{sid}'")) == 4


def test_the_scope_does_not_leak_across_pooled_transactions(secure_rt: Runtime) -> None:
    a = Principal("t-rls-p", "alice")
    _populate(secure_rt, a)
    for _ in range(5):  # the pool hands the same connections back
        assert _raw(secure_rt, a, "SELECT steprun_scope('user_id')")[0][0] == "alice"
        assert _raw(secure_rt, None, "SELECT steprun_scope('user_id')")[0][0] == ""
        assert _raw(secure_rt, None, "SELECT current_user")[0][0] == "steprun_app"
        assert _raw(secure_rt, SYSTEM, "SELECT current_user")[0][0] != "steprun_app"  # the owner's own pool


# --- an injected statement on the application's connection ---------------------------------------------

def _denied(db: Session, sql: str, params: dict | None = None) -> str:
    """Run ``sql`` in a SAVEPOINT; return the database's refusal (the test fails if it is not refused)."""
    try:
        with db.begin_nested():
            db.execute(text(sql), params or {})
    except DBAPIError as exc:
        return str(exc.orig).splitlines()[0]
    raise AssertionError(f"not refused: {sql}")


def _tenant_document(rt: Runtime, who: Principal) -> str:
    with unit_of_work(rt.sessions, who, service=True) as db:  # a service key writes tenant-wide documents
        row = knowledge.add_document(db, rt.settings, who, {"title": "handbook", "text": "shared", "scope": "tenant"},
                                     service=True)
        return row.id


def test_injected_statements_on_the_app_connection_reach_no_other_principal(secure_rt: Runtime) -> None:
    """The red team's statements, on the application's own connection, inside a request's transaction."""
    alice, bob, globex = (Principal("t-inj-a", "alice"), Principal("t-inj-a", "bob"), Principal("t-inj-g", "eve"))
    for who in (alice, bob, globex):
        _populate(secure_rt, who)
    doc = _tenant_document(secure_rt, alice)
    owner = _raw(secure_rt, SYSTEM, "SELECT tableowner FROM pg_tables WHERE tablename = 'sessions'")[0][0]
    others = "SELECT count(*) FROM sessions WHERE user_id <> 'alice' OR tenant_id <> 't-inj-a'"
    assert _raw(secure_rt, SYSTEM, others)[0][0] >= 2  # the rows are there: the system path sees them

    with unit_of_work(secure_rt.sessions, alice) as db:
        def sees_others() -> int:
            return db.execute(text(others)).scalar_one()

        assert db.execute(text("SELECT count(*) FROM sessions")).scalar_one() >= 1  # her own
        # The old settings: nothing reads them any more.
        db.execute(text("SELECT set_config('steprun.user_id', 'bob', true)"))
        assert sees_others() == 0
        db.execute(text("SELECT set_config('steprun.tenant_id', 't-inj-g', true), "
                        "set_config('steprun.user_id', 'eve', true)"))
        assert sees_others() == 0
        db.execute(text("SELECT set_config('steprun.system', 'on', true)"))
        assert sees_others() == 0
        assert db.execute(text("SELECT count(*) FROM turns WHERE tenant_id = 't-inj-g'")).scalar_one() == 0
        # Set within the very statement that reads (a per-row setting would be read after the change).
        assert db.execute(text("SELECT count(*) FROM (SELECT set_config('steprun.user_id', 'bob', true) x, s.* "
                               "FROM sessions s) q WHERE user_id = 'bob'")).scalar_one() == 0
        # Roles: the login is the app's own, there is nothing to return to and nothing to become.
        db.execute(text("RESET ROLE"))
        assert db.execute(text("SELECT current_user, session_user")).one() == ("steprun_app", "steprun_app")
        assert sees_others() == 0
        assert "permission denied" in _denied(db, f'SET ROLE "{owner}"')
        assert "permission denied" in _denied(db, f'SET SESSION AUTHORIZATION "{owner}"')
        # Credentials, tenancy, the schema: not writable (not even readable).
        assert "permission denied" in _denied(
            db, "INSERT INTO api_keys (id, tenant_id, user_id, key_hash, prefix, created_at, admin) "
                "VALUES ('key_forged', 't-inj-g', NULL, 'x', 'sr_x', now(), false)")
        assert "permission denied" in _denied(db, "INSERT INTO tenants (id) VALUES ('t-forged')")
        assert "permission denied" in _denied(db, "SELECT key_hash FROM api_keys")
        assert "permission denied" in _denied(db, "UPDATE alembic_version SET version_num = '0001'")
        # Tenant-wide documents: readable, not writable, by a user.
        assert db.execute(text("SELECT count(*) FROM knowledge_documents WHERE id = :d"), {"d": doc}).scalar_one() == 1
        assert rowcount(db.execute(text("UPDATE knowledge_documents SET title = 'defaced' WHERE id = :d"),
                                   {"d": doc})) == 0
        assert rowcount(db.execute(text("DELETE FROM knowledge_chunks WHERE document_id = :d"), {"d": doc})) == 0
        assert "row-level security" in _denied(
            db, "INSERT INTO knowledge_documents (id, tenant_id, user_id, title, format, scope, text, chunk_count, "
                "created_at) VALUES ('doc_forged', 't-inj-a', NULL, 'x', 'text', 'tenant', 'x', 0, now())")
        # The scope itself: its state is the owner's, the key is handed out once, a forged entry is refused.
        assert "permission denied" in _denied(db, "SELECT * FROM pg_temp.steprun_scope_key")
        for sequence in ("steprun_scope_seq", "steprun_scope_fp_a", "steprun_scope_fp_b"):
            assert "permission denied" in _denied(db, f"SELECT setval('pg_temp.{sequence}', 1)")
        entered = db.execute(text("SELECT current_setting('steprun.scope')")).scalar_one()
        n = int(entered.split("\x1f")[0])
        forgeries = (f"{n}\x1ft-inj-g\x1feve\x1f\x1f", f"{n}\x1ft-inj-a\x1fbob\x1f\x1f",
                     f"{n - 1}\x1ft-inj-a\x1fbob\x1f\x1f",
                     f"{n}\x1ft-inj-a\x1falice\x1f\x1fon")  # another's scope; her own as a service key
        for forged in forgeries:
            db.execute(text("SELECT set_config('steprun.scope', :f, true)"), {"f": forged})
            assert db.execute(text("SELECT steprun_scope('tenant_id'), steprun_scope('service')")).one() == ("", "")
            assert sees_others() == 0
        db.execute(text("SELECT set_config('steprun.scope', :f, true)"), {"f": entered})  # her own, as entered
        assert "already opened" in _denied(db, "SELECT steprun_open()")
        assert "not signed" in _denied(db, "SELECT steprun_enter(999999, 't-inj-g\x1feve\x1f\x1f', repeat('0', 64))")
        assert "permission denied" in _denied(db, "CREATE TEMP TABLE steprun_scope_state (x int)")
        assert sees_others() == 0
    assert _raw(secure_rt, SYSTEM, f"SELECT title FROM knowledge_documents WHERE id = '{doc}'") == [("handbook",)]
    assert _raw(secure_rt, SYSTEM, "SELECT count(*) FROM api_keys WHERE id = 'key_forged'") == [(0,)]


def test_a_seen_scope_cannot_be_replayed_even_after_a_rollback(secure_rt: Runtime) -> None:
    """Another connection's ``steprun_enter`` call is visible in pg_stat_activity; replaying it gets nothing."""
    bob = Principal("t-replay", "bob")
    _populate(secure_rt, bob)
    raw = secure_rt.app_engine.raw_connection()  # type: ignore[union-attr]
    try:
        key, cur = raw.info["steprun_scope_key"], raw.cursor()

        def enter(n: int, scope: str) -> None:
            mac = hmac.new(key, f"{n}\x1f{scope}".encode(), hashlib.sha256).hexdigest()
            cur.execute("SELECT steprun_enter(%s, %s, %s)", (n, scope, mac))

        n = raw.info["steprun_scope_seq"] + 1
        enter(n, "t-replay\x1fbob\x1f\x1f")  # bob's request: what an observer of pg_stat_activity captures
        cur.execute("SELECT count(*) FROM sessions")
        assert cur.fetchone()[0] >= 1
        raw.rollback()  # his transaction ends without a commit
        enter(n + 1, "\x1f\x1f\x1f")  # the attacker's own request lands on this connection
        cur.execute("ROLLBACK")  # ... which rolls back, begins anew and replays bob's entry
        for statement in ("BEGIN", "SELECT count(*) FROM sessions"):
            cur.execute(statement)
        assert cur.fetchone()[0] == 0  # a new transaction starts with no scope
        with pytest.raises(psycopg2.Error, match="already used"):
            enter(n, "t-replay\x1fbob\x1f\x1f")
        raw.rollback()
        cur.execute("DISCARD TEMP")  # drop the state, to open it anew with a key of one's own
        raw.commit()
        with pytest.raises(psycopg2.Error, match="already opened"):
            cur.execute("SELECT steprun_open()")
        raw.rollback()
        with pytest.raises(psycopg2.Error):  # and with its state gone, the connection enters nothing
            enter(n + 2, "t-replay\x1fbob\x1f\x1f")
        raw.rollback()
    finally:
        raw.invalidate()  # not back into the pool: its state is gone


def test_unsafe_logins_are_refused_outside_dev(settings: Settings) -> None:
    superuser = settings.replace(app_database_url=settings.database_url)  # the test cluster's login: a superuser
    with pytest.raises((SettingsError, UnsafeLogin), match="is a superuser"):
        # Refused at start; or, if the check could not connect then, at the first connection it makes.
        rt = build_runtime(superuser)
        try:
            with unit_of_work(rt.sessions, Principal("t-unsafe", "u")) as db:
                db.execute(text("SELECT 1"))
        finally:
            rt.close()
    with pytest.raises(SettingsError, match="STEPRUN_DB_ROLE=none"):
        build_runtime(settings.replace(db_role="none"))
    dev = build_runtime(settings.replace(db_role="none"), dev=True)  # steprun dev may, with a warning
    try:
        assert dev.app_engine is None
    finally:
        dev.close()


@contextmanager
def _probe_table(rt: Runtime, *statements: str) -> Iterator[str]:
    """A throwaway table (one ``tenant_id`` column) with ``statements`` run on it; dropped afterwards."""
    table = f"probe_{secrets.token_hex(4)}"
    with rt.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (tenant_id text)"))
        for statement in statements:
            conn.execute(text(statement.format(table=table)))
    try:
        yield table
    finally:
        with rt.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))


def test_migrate_refuses_a_policy_that_reads_a_forgeable_setting(settings: Settings, rt: Runtime) -> None:
    """A policy written the old way (a later migration, say) would trust set_config: `steprun migrate` says so."""
    with _probe_table(rt, "CREATE POLICY old_style ON {table} "
                          "USING (tenant_id = current_setting('steprun.tenant_id', true))") as table:
        with pytest.raises(SettingsError, match=f"{table}.old_style"):
            ensure_app_login(rt.engine, settings)
    ensure_app_login(rt.engine, settings)  # and without it, all is well


def test_migrate_refuses_a_table_that_forces_row_security_on_its_owner(settings: Settings, rt: Runtime) -> None:
    """FORCE would bind the owner, which is the system path now: its sweeps would see none of the rows."""
    with _probe_table(rt, "ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
                      "ALTER TABLE {table} FORCE ROW LEVEL SECURITY") as table:
        with pytest.raises(SettingsError, match=f"tables {table} FORCE"):
            ensure_app_login(rt.engine, settings)


def test_the_tenant_totals_function_answers_for_the_scopes_own_tenant_only(secure_rt: Runtime) -> None:
    """A new turn reads its tenant's queued turns and kept input through steprun_tenant_admission (0021),
    in its own transaction: the app login gets its own tenant's totals, never another tenant's."""
    mine, other = Principal("t-adm-a", "alice"), Principal("t-adm-b", "bob")
    with unit_of_work(secure_rt.sessions, other) as db:
        session = turns.create_session(db, secure_rt, other, "math", {})
        turns.create_turn(db, secure_rt, other, session.id, "queued behind nothing", after_seconds=3600)
    with unit_of_work(secure_rt.sessions, other) as db:
        assert db.execute(text("SELECT * FROM steprun_tenant_admission('t-adm-b', true, true)")).one() == (1, 21)
    with unit_of_work(secure_rt.sessions, mine) as db:
        assert db.execute(text("SELECT * FROM steprun_tenant_admission('t-adm-a', true, false)")).one() == (0, None)
        assert "tenant's totals" in _denied(db, "SELECT * FROM steprun_tenant_admission('t-adm-b', true, true)")
    with unit_of_work(secure_rt.sessions, None) as db:  # no scope entered: no tenant
        assert "tenant's totals" in _denied(db, "SELECT * FROM steprun_tenant_admission('t-adm-b', true, true)")
    with unit_of_work(secure_rt.sessions, SYSTEM) as db:  # the owner's login may ask for any tenant
        assert db.execute(text("SELECT * FROM steprun_tenant_admission('t-adm-b', true, false)")).one() == (1, None)


def test_a_connection_whose_scope_entry_fails_is_not_used_again(secure_rt: Runtime) -> None:
    """The scope's entry goes with the transaction's first statement; if the server refuses it (the state it
    opened is not what this connection holds), that statement fails and the connection is dropped."""
    conn = secure_rt.app_engine.connect()  # type: ignore[union-attr]
    try:
        conn.info["steprun_scope_key"] = secrets.token_bytes(32)  # no longer the key the server holds
        db = secure_rt.sessions(bind=conn)
        set_scope(db, Principal("t-tamper", "mallory"))
        with pytest.raises(ProgrammingError, match="not signed"):
            db.execute(text("SELECT count(*) FROM sessions"))
        assert conn.invalidated
        db.close()
    finally:
        conn.close()
    assert _raw(secure_rt, Principal("t-tamper", "mallory"), "SELECT count(*) FROM sessions") == [(0,)]
