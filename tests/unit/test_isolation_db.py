"""Row-level security at the database: a query bug still cannot read or write another user's rows."""
from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError

from shared.auth.principal import SYSTEM, Principal
from shared.db import unit_of_work
from shared.engine.step import build_runtime, run_step
from shared.runtime import Runtime
from shared.settings import Settings
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
        assert _raw(secure_rt, a, "SELECT current_setting('steprun.user_id', true)")[0][0] == "alice"
        assert _raw(secure_rt, None, "SELECT current_setting('steprun.user_id', true)")[0][0] in ("", None)
        assert _raw(secure_rt, None, "SELECT current_user")[0][0] == "steprun_app"
