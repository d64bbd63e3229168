"""Engine, session factory and the unit of work. Opened by each process's entrypoint, never at import.

A unit of work is one transaction scoped to a principal (row-level security on
Postgres). Work that must wait for its commit, such as enqueueing a step or
publishing an event, is registered with :func:`after_commit`: a task can never
run before its row exists.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from shared.auth.principal import SYSTEM, Scope, TenantAdmin
from shared.settings import Settings

log = logging.getLogger(__name__)


def private_sqlite_file(data_dir: str, path: str) -> None:
    """The data folder (0700) and the SQLite file (0600) readable by their owner only: they hold keys'
    hashes and every conversation. SQLite gives its -wal and -shm files the database file's mode."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    if not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for name in (path, path + "-wal", path + "-shm"):
        try:
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            pass


def make_engine(settings: Settings) -> Engine:
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        private_sqlite_file(settings.data_dir, url.removeprefix("sqlite:///"))
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while a step commits; foreign keys make deletes cascade.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    engine = create_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        # Fail fast instead of queueing forever when the pool is exhausted.
        pool_timeout=5,
        pool_recycle=1800,
        # A failed statement's error (and its log line) must not carry user content: no parameters in it.
        hide_parameters=True,
    )
    ping_idle_connections(engine, settings.db_ping_idle_seconds)
    return engine


def ping_idle_connections(engine: Engine, idle_seconds: float) -> None:
    """Ping a pooled connection before use only if it sat idle longer than ``idle_seconds``.

    ``pool_pre_ping`` pings at every checkout: a round trip, and a transaction of its own
    for Postgres, before every unit of work (half the transactions of a turn). A connection
    in steady use is known alive; one that died anyway (the server restarted) fails its
    statement, which invalidates the whole pool (SQLAlchemy's disconnect handling), and the
    API answers 503 / the worker retries its commit. An idle one may have been cut (server
    restart, idle timeouts): it is pinged, and replaced if dead.
    """
    from sqlalchemy import exc as sa_exc

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since <= idle_seconds and idle_seconds > 0:
            return  # new (just connected), or in steady use
        try:
            cur = dbapi_conn.cursor()
            try:
                cur.execute("SELECT 1")
            finally:
                cur.close()
            dbapi_conn.rollback()
        except Exception as exc:  # noqa: BLE001 - any failure here means this connection is unusable
            raise sa_exc.DisconnectionError(f"pooled connection failed its ping: {exc}") from exc


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose committed work runs its :func:`after_commit` callbacks."""
    factory = sessionmaker(engine, expire_on_commit=False)

    @event.listens_for(factory, "after_commit")
    def _run(db: Session) -> None:
        if db.in_nested_transaction():
            return  # a SAVEPOINT released: the work is not committed until the outer transaction is
        for callback in db.info.pop("after_commit", []):
            try:
                callback()
            except Exception:  # noqa: BLE001 - committed state is safe; the scheduler re-sends lost work
                log.exception("after-commit action failed; the scheduler will recover it")

    @event.listens_for(factory, "after_transaction_create")
    def _mark(db: Session, transaction: SessionTransaction) -> None:
        if transaction.nested:  # a SAVEPOINT: remember which callbacks were registered before it
            db.info.setdefault("savepoints", {})[id(transaction)] = len(db.info.get("after_commit", []))

    @event.listens_for(factory, "after_transaction_end")
    def _unmark(db: Session, transaction: SessionTransaction) -> None:
        if transaction.nested:
            db.info.get("savepoints", {}).pop(id(transaction), None)

    @event.listens_for(factory, "after_rollback")
    def _drop(db: Session) -> None:
        nested = db.get_nested_transaction()
        if nested is not None:
            # A SAVEPOINT rolled back: drop only what was registered inside it; the outer
            # transaction's work may still commit.
            mark = db.info.get("savepoints", {}).get(id(nested))
            if mark is not None and "after_commit" in db.info:
                del db.info["after_commit"][mark:]
            return
        db.info.pop("after_commit", None)

    return factory


def after_commit(db: Session, callback: Callable[[], Any]) -> None:
    """Run ``callback`` once the current transaction commits; drop it on rollback.

    This is how work is enqueued: a task can never run before its row exists.
    """
    db.info.setdefault("after_commit", []).append(callback)


def rowcount(result: Result[Any]) -> int:
    """How many rows an UPDATE or DELETE (without RETURNING) matched.

    ``Session.execute`` is typed as returning a plain :class:`~sqlalchemy.Result`;
    for these statements it is a :class:`~sqlalchemy.CursorResult`, which carries
    the count.
    """
    if not isinstance(result, CursorResult):
        raise TypeError(f"expected the CursorResult of an UPDATE or DELETE, got {type(result).__name__}")
    return result.rowcount or 0


def set_scope(db: Session, scope: Scope | None) -> Session:
    """Scope ``db`` from its next transaction on (row-level security on Postgres)."""
    db.info["scope"] = scope
    return db


def install_row_security(factory: sessionmaker[Session], role: str | None) -> None:
    """At the start of every transaction, drop to ``role`` and set the principal, transaction-locally.

    Transaction-local (``set_config(..., true)``) so a pooled connection never
    carries one user's scope into the next transaction. ``role`` owns nothing
    and is not a superuser, so the FORCEd policies apply even when the login
    role owns the tables or is a superuser.
    """

    @event.listens_for(factory, "after_begin")
    def _scope(session: Session, _transaction: Any, connection: Any) -> None:
        if connection.dialect.name != "postgresql":
            return
        scope = session.info.get("scope")
        admin = scope.tenant_id if isinstance(scope, TenantAdmin) else ""
        tenant = "" if admin else getattr(scope, "tenant_id", "") or ""
        user = getattr(scope, "user_id", "") or ""
        params = {"t": tenant, "u": user, "s": "on" if scope is SYSTEM else "", "a": admin}
        sql = ("SELECT set_config('steprun.tenant_id', %(t)s, true), set_config('steprun.user_id', %(u)s, true), "
               "set_config('steprun.system', %(s)s, true), set_config('steprun.admin_tenant_id', %(a)s, true)")
        if role:
            params["r"] = role
            sql += ", set_config('role', %(r)s, true)"
        connection.exec_driver_sql(sql, params)


@contextmanager
def unit_of_work(factory: sessionmaker[Session], scope: Scope | None = None) -> Iterator[Session]:
    """One transaction: committed if the block succeeds, rolled back otherwise."""
    db = factory()
    if scope is not None:
        db.info["scope"] = scope
    try:
        yield db
        db.commit()
    except BaseException:
        db.rollback()
        raise
    finally:
        db.close()


def database_unavailable(exc: BaseException) -> bool:
    """True if ``exc`` means the database cannot be reached right now (retry later), not a bug.

    Connection refused or dropped, a server shutting down or starting up, a full
    pool: the API answers 503 with Retry-After, and a worker retries its commit.
    """
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)
