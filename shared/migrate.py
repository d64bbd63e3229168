"""Database schema to head, with Alembic, for Postgres and the embedded SQLite file; and the application login."""
from __future__ import annotations

import os
import time
from collections.abc import Callable

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError

from shared.settings import Settings, SettingsError, app_login_password

MIGRATIONS = os.path.join(os.path.dirname(__file__), "migrations")
# Tables the application login may not read or write: credentials, tenancy, the schema's version and the
# fleet's own figures (written by the system path only).
SYSTEM_ONLY_TABLES = ("api_keys", "tenants", "alembic_version", "worker_heartbeats", "queue_samples")
SCOPE_FUNCTIONS = ("steprun_open()", "steprun_enter(bigint, text, text)", "steprun_scope(text)",
                   "steprun_tenant_admission(text, boolean, boolean)")


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head", settings: Settings | None = None) -> None:
    """Bring the schema to ``revision``; on Postgres, then create or update the application login."""
    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    if engine.dialect.name == "postgresql" and revision == "head":
        ensure_app_login(engine, settings or Settings.from_env())


def app_login_name(settings: Settings) -> str | None:
    """The application login's name (STEPRUN_APP_DATABASE_URL's user, else STEPRUN_DB_ROLE), or None."""
    if settings.app_database_url:
        return make_url(settings.app_sqlalchemy_url or settings.app_database_url).username
    return None if settings.db_role in ("", "none") else settings.db_role


def ensure_app_login(engine: Engine, settings: Settings) -> None:
    """The login the application runs as: owns nothing, is a member of nothing, may touch user data only.

    Idempotent, run by every ``steprun migrate``. Created here (LOGIN, NOINHERIT, no superuser, no
    BYPASSRLS), with the password derived from DATABASE_URL's, unless STEPRUN_APP_DATABASE_URL names a
    login made elsewhere. Roles are cluster-wide: databases sharing a cluster share the login (each grants it
    on its own tables); give each deployment its own STEPRUN_DB_ROLE if their owners' passwords differ.
    """
    role = app_login_name(settings)
    if role is None:
        return
    password = None if settings.app_database_url else app_login_password(engine.url.password, role)
    for attempt in range(5):  # parallel migrations of several databases race on the shared role's row
        try:
            with engine.begin() as conn:
                _provision(conn, role, password, create=not settings.app_database_url)
            return
        except DBAPIError as exc:
            if "concurrently" not in str(exc.orig) or attempt == 4:
                raise
            time.sleep(0.1 * (attempt + 1))



def _refuse_any(conn: Connection, query: str, params: dict[str, str], explain: Callable[[str], str]) -> None:
    """Refuse to go on (SettingsError, ``explain(found)``) if ``query``'s one value, a list of names, is not empty."""
    found = conn.execute(text(query), params).scalar()
    if found:
        raise SettingsError(explain(found))


def _provision(conn: Connection, role: str, password: str | None, *, create: bool) -> None:
    q = conn.exec_driver_sql
    row = conn.execute(text("SELECT rolcanlogin, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolinherit "
                            "FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
    quoted = conn.dialect.identifier_preparer.quote(role)
    owner = conn.execute(text("SELECT current_user")).scalar_one()
    if role == owner:
        raise SettingsError(f"the application login {role!r} is DATABASE_URL's own login: it owns the tables. Give "
                            "the application its own login (STEPRUN_DB_ROLE or STEPRUN_APP_DATABASE_URL)")
    if row is None:
        if not create:
            raise SettingsError(f"STEPRUN_APP_DATABASE_URL names the login {role!r}, which does not exist")
        attributes = "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB NOINHERIT NOREPLICATION"
        try:
            with conn.begin_nested():
                q(f"CREATE ROLE {quoted} {attributes}")
        except DBAPIError as exc:
            if "already exists" not in str(exc.orig):
                if "permission denied" in str(exc.orig):
                    raise SettingsError(
                        f"DATABASE_URL's login may not create the application login {role!r}: create a login "
                        "(on Heroku: `heroku pg:credentials:create --name steprun_app`) and set "
                        "STEPRUN_APP_DATABASE_URL to its URL") from None
                raise
        row = conn.execute(text("SELECT rolcanlogin, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolinherit "
                                "FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
    assert row is not None
    can_login, superuser, bypass, createrole, createdb, inherit = row
    if superuser or bypass or createrole:
        raise SettingsError(f"the application login {role!r} is a superuser or may bypass row-level security or "
                            "create roles: it must be an ordinary login (ALTER ROLE ... NOSUPERUSER NOBYPASSRLS "
                            "NOCREATEROLE)")
    if create and (not can_login or createdb or inherit):  # 0004 made it NOLOGIN: now it is the login
        q(f"ALTER ROLE {quoted} LOGIN NOCREATEDB NOINHERIT")
    if password is not None:
        q(f"ALTER ROLE {quoted} PASSWORD '{password}'")  # a hex digest: no quote can occur in it
    _refuse_any(conn, "SELECT string_agg(m.roleid::regrole::text, ', ') FROM pg_auth_members m "
                "WHERE m.member = (SELECT oid FROM pg_roles WHERE rolname = :r)", {"r": role},
                lambda found: f"the application login {role!r} is a member of {found}: it must gain nothing "
                              f"(REVOKE {found} FROM {role})")
    _refuse_any(conn, "SELECT string_agg(tablename || '.' || policyname, ', ') FROM pg_policies "
                "WHERE schemaname = current_schema() AND (qual LIKE '%current_setting(''steprun.%' "
                "OR with_check LIKE '%current_setting(''steprun.%')", {},
                lambda found: f"row-level security policies {found} read a setting any statement can change "
                              "(current_setting('steprun.…')): write them with (SELECT steprun_scope('tenant_id')) "
                              "and the like (migration 0014)")
    _refuse_any(conn, "SELECT string_agg(relname, ', ') FROM pg_class "
                "WHERE relnamespace = current_schema()::regnamespace AND relforcerowsecurity", {},
                lambda found: f"tables {found} FORCE row-level security, which binds their owner: the system "
                              "path (DATABASE_URL's login) would see none of their rows (ALTER TABLE … NO FORCE "
                              "ROW LEVEL SECURITY; migration 0014)")
    schema = conn.execute(text("SELECT current_schema()")).scalar_one()
    s = conn.dialect.identifier_preparer.quote(schema)
    q(f"GRANT USAGE ON SCHEMA {s} TO {quoted}")
    q(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {quoted}")
    q(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {quoted}")
    q(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {quoted}")
    q(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT USAGE, SELECT ON SEQUENCES TO {quoted}")
    present = set(conn.execute(text(
        "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace")).scalars())
    for table in SYSTEM_ONLY_TABLES:
        if table in present:
            q(f'REVOKE ALL ON {s}."{table}" FROM {quoted}')
    for function in SCOPE_FUNCTIONS:
        q(f"GRANT EXECUTE ON FUNCTION {s}.{function} TO {quoted}")
    if conn.execute(text("SELECT has_schema_privilege(:r, current_schema(), 'CREATE')"), {"r": role}).scalar():
        q(f"REVOKE CREATE ON SCHEMA {s} FROM PUBLIC")  # Postgres before 15 grants it; a non-owner only warns
        q(f"REVOKE CREATE ON SCHEMA {s} FROM {quoted}")
    creates = conn.execute(text(
        "SELECT has_database_privilege(:r, current_database(), 'TEMP'), (SELECT string_agg(nspname, ', ') FROM "
        "pg_namespace WHERE has_schema_privilege(:r, oid, 'CREATE'))"), {"r": role}).one()
    if creates[0] or creates[1]:
        raise SettingsError(
            f"the application login {role!r} may create objects ("
            + ("TEMPORARY on the database" if creates[0] else f"CREATE on schema {creates[1]}")
            + "), with which it could replace its connection's scope: the owner must revoke it "
            "(REVOKE TEMPORARY ON DATABASE <db> FROM PUBLIC; REVOKE CREATE ON SCHEMA <schema> FROM PUBLIC)")
