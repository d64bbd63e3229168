"""Engine, session factory and the unit of work. Opened by each process's entrypoint, never at import.

A unit of work is one transaction scoped to a principal (row-level security on
Postgres). Work that must wait for its commit, such as enqueueing a step or
publishing an event, is registered with :func:`after_commit`: a task can never
run before its row exists.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import CursorResult, Engine, Executable, Result, create_engine, event, text
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from shared.auth.principal import SYSTEM, Scope, TenantAdmin
from shared.pool import LingeringQueuePool
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


def make_app_engine(settings: Settings, url: str, *, allow_unsafe: bool = False) -> Engine:
    """The application login's engine: each new connection opens its scope store (:func:`open_scope_store`)."""
    engine = make_engine(settings, url)

    @event.listens_for(engine, "connect")
    def _open(dbapi_conn: Any, record: Any) -> None:
        open_scope_store(dbapi_conn, record, allow_unsafe=allow_unsafe)

    return engine


def make_engine(settings: Settings, url: str | None = None) -> Engine:
    """The owner's engine (``settings.sqlalchemy_url``), or one on ``url`` with the same pool settings."""
    url = url or settings.sqlalchemy_url
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
        poolclass=LingeringQueuePool,  # a burst's extra connections stay while it lasts (shared/pool.py)
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        # Fail fast instead of queueing forever when the pool is exhausted.
        pool_timeout=5,
        pool_recycle=1800,
        # A failed statement's error (and its log line) must not carry user content: no parameters in it.
        hide_parameters=True,
    )
    ping_idle_connections(engine, settings.db_ping_idle_seconds)
    if engine.dialect.driver == "psycopg2":
        pipeline_transactions(engine)
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


class _RoutedSession(Session):
    """A session on the application's engine, except a :data:`SYSTEM`-scoped one: the owner's (system) engine."""

    system_engine: Engine | None = None

    def get_bind(self, *args: Any, **kw: Any) -> Any:
        if self.system_engine is not None and self.info.get("scope") is SYSTEM:
            return self.system_engine
        return super().get_bind(*args, **kw)


def make_sessionmaker(engine: Engine, system_engine: Engine | None = None) -> sessionmaker[Session]:
    """Sessions whose committed work runs its :func:`after_commit` callbacks.

    With ``system_engine``, sessions scoped to :data:`SYSTEM` (claim, sweeps, key lookup) run on it, the
    others on ``engine``: the system path never shares the application's connections.
    """
    routed = type("RoutedSession", (_RoutedSession,), {"system_engine": system_engine})
    factory: sessionmaker[Session] = sessionmaker(engine, class_=routed, expire_on_commit=False)

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


# Writes held by :func:`write_later` on a DBAPI connection (its pool record's info), until they are sent.
_HELD_WRITES = "steprun_held_writes"


def write_later(db: Session, statement: Executable, params: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Run ``statement`` (a write whose result nobody reads: no RETURNING, no row count) in ``db``'s transaction.

    On Postgres it is held, its values bound now, and sent with the other writes held ahead of the
    transaction's next statement or its COMMIT, in that statement's round trip
    (:func:`pipeline_transactions`): no round trip of its own, and none of SQLAlchemy's per-statement
    execution (about 0.1 ms of CPU each). The order of every statement is unchanged, so
    whatever runs next sees the write; only an error it raises is raised by that next statement or the
    commit instead (so not inside a SAVEPOINT whose failure the caller handles). Elsewhere (SQLite) it
    runs at once. ``params``: one row, or a list of rows, each a statement of its own.
    """
    conn = db.connection()
    rows = params if isinstance(params, list) else [params]
    if conn.dialect.driver != "psycopg2":
        if rows:
            conn.execute(statement, rows if isinstance(params, list) else params)
        return
    held: list[bytes] = conn.info.setdefault(_HELD_WRITES, [])
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        for row in rows:
            held.append(cursor.mogrify(*_rendered(conn.dialect, statement, row)))
    finally:
        cursor.close()


# Per statement (by identity, kept alive here) and set of keys given: its SQL and how to bind a row to it.
_RENDERED: dict[tuple[int, Any, frozenset[str]], tuple[Executable, Any, dict[str, Any], list[tuple[str, Any]]]] = {}


def _rendered(dialect: Any, statement: Executable, row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``statement``'s SQL for ``dialect`` and ``row``'s values bound as SQLAlchemy binds them (types'
    bind processors, a column's Python default or onupdate where the row leaves it out)."""
    key = (id(statement), dialect, frozenset(row))
    entry = _RENDERED.get(key)
    if entry is None:
        compiled: Any = statement.compile(dialect=dialect, column_keys=sorted(row))  # type: ignore[attr-defined]
        processors = {k: f for k, f in compiled._bind_processors.items() if f is not None}
        defaults = []
        for column, default in [*((c, c.default) for c in compiled.insert_prefetch),
                                *((c, c.onupdate) for c in compiled.update_prefetch)]:
            if column.key in row:
                continue
            if default is None or not (default.is_scalar or default.is_callable):
                raise ValueError(f"write_later: {column} has no value and no Python default to give it")
            defaults.append((column.key, default))
        entry = _RENDERED[key] = (statement, compiled, processors, defaults)
    _, compiled, processors, defaults = entry
    bound: dict[str, Any] = compiled.construct_params(row)
    for name, default in defaults:
        bound[name] = default.arg if default.is_scalar else default.arg(None)
    for name, process in processors.items():
        if name in bound:
            bound[name] = process(bound[name])
    return compiled.string, bound


_BEGUN = "steprun_begun"  # BEGIN is due: the transaction began, nothing of it has been sent
_SENT_AS = "steprun_sent_as"  # (the statement as sent, with what went ahead of it; as the caller gave it)
_ENTER = "steprun_scope_entry"  # the transaction's scope entry (install_row_security), its SQL, until it is sent


def pipeline_transactions(engine: Engine) -> None:
    """A transaction's BEGIN and held statements (:func:`write_later`, the scope's entry) go with its next
    statement, in the same round trip, and whatever is still held goes with its COMMIT.

    psycopg2 sends BEGIN in a round trip of its own before a transaction's first statement. On a
    connection in use by SQLAlchemy (from its checkout to its checkin) the driver is put in autocommit
    mode and the dialect's begin, commit and rollback are this module's: BEGIN is sent ahead of the first
    statement (``BEGIN;…;statement``: Postgres answers with the last statement's result, so rows and row
    counts are as before), a transaction that ran nothing sends nothing, and held writes go out as
    ``…;COMMIT``. The order of every statement is unchanged. A statement's error names the statement
    alone, never what went ahead of it (held values are user content). A driver connection handed out
    raw (``engine.raw_connection()``) keeps the driver's own transactions.
    """
    dialect: Any = engine.dialect
    encodings = dialect.loaded_dbapi.extensions.encodings  # the server's encoding names, as Python's
    driver_commit, driver_rollback = dialect.do_commit, dialect.do_rollback

    def ahead(info: dict[str, Any]) -> tuple[list[bytes], bool]:
        """What goes ahead of the next statement: BEGIN if due, the scope's entry, the held writes; and
        whether anything of the transaction's own (a held write) is in it."""
        parts = [b"BEGIN"] if info.pop(_BEGUN, False) else []
        entry = info.pop(_ENTER, None)
        if entry is not None:
            parts.append(entry)
        held = info.pop(_HELD_WRITES, ())
        parts.extend(held)
        return parts, bool(held)

    def info_of(fairy: Any) -> dict[str, Any]:
        try:
            return fairy.info
        except NotImplementedError:  # the dialect's own first connection: not pooled, nothing held
            return {}

    def do_begin(fairy: Any) -> None:
        if fairy.dbapi_connection.autocommit:
            fairy.info[_BEGUN] = True

    def do_commit(fairy: Any) -> None:
        dbapi_conn, info = fairy.dbapi_connection, info_of(fairy)
        begun = bool(info.get(_BEGUN))
        parts, writes = ahead(info)
        if not dbapi_conn.autocommit:
            if parts:
                _execute(dbapi_conn, b";".join(parts))
            driver_commit(fairy)
            return
        if (begun and not writes) or (not parts and dbapi_conn.info.transaction_status == _IDLE):
            return  # the transaction ran nothing (its scope's entry is not needed): there is nothing to commit
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(b";".join([*parts, b"COMMIT"]))
            ended = cursor.statusmessage
        finally:
            cursor.close()
        if ended != "COMMIT":  # Postgres ends a failed transaction's COMMIT as a ROLLBACK, with no error
            raise dialect.loaded_dbapi.InternalError(f"the transaction was rolled back at its commit ({ended})")

    def do_rollback(fairy: Any) -> None:
        dbapi_conn, info = fairy.dbapi_connection, info_of(fairy)
        _forget(info)  # never sent: nothing to undo
        if not dbapi_conn.autocommit:
            driver_rollback(fairy)
        elif dbapi_conn.info.transaction_status != _IDLE:
            _execute(dbapi_conn, b"ROLLBACK")

    dialect.do_begin, dialect.do_commit, dialect.do_rollback = do_begin, do_commit, do_rollback

    @event.listens_for(engine, "engine_connect")
    def _pipelined(conn: Any) -> None:
        dbapi_conn = conn.connection.dbapi_connection
        if not dbapi_conn.autocommit:
            dbapi_conn.autocommit = True

    @event.listens_for(engine, "checkin")
    def _driver_transactions(dbapi_conn: Any, record: Any) -> None:
        if dbapi_conn is not None and dbapi_conn.autocommit and dbapi_conn.info.transaction_status == _IDLE:
            dbapi_conn.autocommit = False  # for whoever takes it raw

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def _with_what_is_due(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                          many: bool) -> tuple[str, Any]:
        info = conn.info
        entered = info.get(_ENTER) is not None
        parts, _ = ahead(info)
        if not parts:
            return statement, params
        if many:  # run apart: the statement runs once per row
            cursor.execute(b";".join(parts))
            return statement, params
        sent = b";".join(parts).decode(encodings[cursor.connection.encoding]) + ";"
        if params or context is None or not context.no_parameters:
            sent = sent.replace("%", "%%")  # the driver interpolates the statement's parameters into it all
        sent += statement
        info[_SENT_AS] = (sent, statement, entered)
        return sent, params

    @event.listens_for(engine, "after_cursor_execute")
    def _sent(conn: Any, *_args: Any) -> None:
        conn.info.pop(_SENT_AS, None)

    @event.listens_for(engine, "handle_error")
    def _as_the_caller_gave_it(ctx: Any) -> None:
        conn = ctx.connection
        sent = conn.info.pop(_SENT_AS, None) if conn is not None and not conn.invalidated else None
        if sent is None or ctx.statement != sent[0]:
            return
        if ctx.sqlalchemy_exception is not None:
            ctx.sqlalchemy_exception.statement = sent[1]
        diag = getattr(ctx.original_exception, "diag", None)
        if sent[2] and "steprun_enter" in (getattr(diag, "context", None) or ""):
            # The scope's entry failed: this connection's scope state is not what it opened. Not used again.
            ctx.is_disconnect, ctx.invalidate_pool_on_disconnect = True, False

    @event.listens_for(engine, "reset")
    def _drop_at_checkin(_dbapi_conn: Any, record: Any, _state: Any) -> None:
        _forget(record.info)

    @event.listens_for(engine, "invalidate")
    def _drop_if_invalidated(_dbapi_conn: Any, record: Any, _exc: Any) -> None:
        _forget(record.info)


def _forget(info: dict[str, Any]) -> None:
    """Drop what a connection holds for its transaction (nothing of it was sent)."""
    for key in (_BEGUN, _HELD_WRITES, _ENTER, _SENT_AS):
        info.pop(key, None)


_IDLE = 0  # psycopg2.extensions.TRANSACTION_STATUS_IDLE


def _execute(dbapi_conn: Any, sql: bytes) -> None:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(sql)  # no parameters: the SQL is sent as it is, values bound
    finally:
        cursor.close()


def rowcount(result: Result[Any]) -> int:
    """How many rows an UPDATE or DELETE (without RETURNING) matched.

    ``Session.execute`` is typed as returning a plain :class:`~sqlalchemy.Result`;
    for these statements it is a :class:`~sqlalchemy.CursorResult`, which carries
    the count.
    """
    if not isinstance(result, CursorResult):
        raise TypeError(f"expected the CursorResult of an UPDATE or DELETE, got {type(result).__name__}")
    return result.rowcount or 0


def set_scope(db: Session, scope: Scope | None, *, service: bool = False) -> Session:
    """Scope ``db`` from its next transaction on (row-level security on Postgres).

    ``service``: the principal acts through a service key, which may also write its tenant's tenant-wide
    rows (knowledge documents); a user's scope reads them only.
    """
    db.info["scope"] = scope
    db.info["service"] = service
    return db


class UnsafeLogin(RuntimeError):
    """The application's login could get past row-level security: a superuser, BYPASSRLS, a member of a role,
    or allowed to create objects (which could replace its connection's scope state or shadow what the policies
    call)."""


def open_scope_store(dbapi_conn: Any, record: Any, *, allow_unsafe: bool = False) -> None:
    """At connect, on the application's login: create this connection's private scope state, keep its key.

    ``steprun_open()`` (migration 0014) runs once per connection and hands the key out once; the same round
    trip reads what the login may do, and a login row-level security would not bind is refused.
    """
    cur = dbapi_conn.cursor()
    try:
        cur.execute("SELECT steprun_open(), r.rolname, r.rolsuper, r.rolbypassrls, EXISTS (SELECT 1 FROM "
                    "pg_auth_members m WHERE m.member = r.oid), has_database_privilege(current_database(), 'TEMP') "
                    "OR EXISTS (SELECT 1 FROM pg_namespace n WHERE has_schema_privilege(n.oid, 'CREATE')) "
                    "FROM pg_roles r WHERE r.rolname = current_user")
        key, name, superuser, bypass, member, creates = cur.fetchone()
        dbapi_conn.commit()
    finally:
        cur.close()
    if (superuser or bypass or member or creates) and not allow_unsafe:
        what = ("a superuser" if superuser else "BYPASSRLS" if bypass else "a member of another role" if member
                else "allowed to create objects (TEMPORARY on the database or CREATE on a schema)")
        raise UnsafeLogin(f"the application login {name!r} is {what}: row-level security would not bind it. "
                          "Run `steprun migrate` to create the steprun_app login, or point STEPRUN_APP_DATABASE_URL "
                          "at an ordinary login")
    record.info["steprun_scope_key"] = bytes.fromhex(key)
    record.info["steprun_scope_seq"] = 0


def _scope_fields(session: Session) -> tuple[str, str, str, str]:
    scope = session.info.get("scope")
    if scope is SYSTEM:
        return ("", "", "", "")  # the system path is the owner's engine; here it sees nothing
    admin = scope.tenant_id if isinstance(scope, TenantAdmin) else ""
    tenant = "" if admin else getattr(scope, "tenant_id", "") or ""
    user = getattr(scope, "user_id", "") or ""
    fields = (tenant, user, admin, "on" if session.info.get("service") and tenant else "")
    if any("\x1f" in f for f in fields):
        raise ValueError("a tenant or user id may not contain U+001F")
    return fields


def install_row_security(factory: sessionmaker[Session], app_engine: Engine | None) -> None:
    """At the start of every transaction on ``app_engine``, enter the session's scope, signed.

    The scope (tenant, user, tenant admin, service key) goes to ``steprun_enter`` with a sequence number and
    their HMAC under the connection's key (:func:`open_scope_store`): a statement on the connection can
    neither forge nor replay one, and the policies read only the scope entered in the running transaction.
    One round trip per transaction, as the settings it replaces. Sessions on the owner's (system) engine
    are not scoped: the policies do not bind the tables' owner.
    """
    if app_engine is None or app_engine.dialect.name != "postgresql":
        return

    @event.listens_for(factory, "after_begin")
    def _scope(session: Session, transaction: SessionTransaction, connection: Any) -> None:
        if transaction.nested or connection.engine is not app_engine:
            return  # a SAVEPOINT keeps its transaction's scope (entering anew inside it would not outlive it)
        info = connection.info
        key = info.get("steprun_scope_key")
        if key is None:
            raise UnsafeLogin("this connection has no scope key (steprun_open did not run)")
        scope = "\x1f".join(_scope_fields(session))
        n = info["steprun_scope_seq"] = info["steprun_scope_seq"] + 1
        mac = hmac.new(key, f"{n}\x1f{scope}".encode(), hashlib.sha256).hexdigest()
        entry = {"n": n, "s": scope, "m": mac}
        dbapi_conn = connection.connection.dbapi_connection
        if getattr(dbapi_conn, "autocommit", False):  # pipelined: it goes with the transaction's first statement
            cursor = dbapi_conn.cursor()
            try:
                info[_ENTER] = cursor.mogrify(_ENTER_SQL, entry)
            finally:
                cursor.close()
            return
        try:
            connection.exec_driver_sql(_ENTER_SQL, entry)
        except Exception:
            connection.invalidate()  # a connection whose scope state was tampered with is not used again
            raise


_ENTER_SQL = "SELECT steprun_enter(%(n)s, %(s)s, %(m)s)"


@contextmanager
def unit_of_work(factory: sessionmaker[Session], scope: Scope | None = None, *,
                 service: bool = False) -> Iterator[Session]:
    """One transaction: committed if the block succeeds, rolled back otherwise (``service``: see :func:`set_scope`)."""
    db = factory()
    if scope is not None:
        set_scope(db, scope, service=service)
    try:
        yield db
        db.commit()
    except BaseException:
        db.rollback()
        raise
    finally:
        db.close()


def lock_key(name: str) -> int:
    """The Postgres advisory lock key (a signed 32-bit int) for ``name``."""
    return zlib.crc32(name.encode()) - 2**31


_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:k)")


def advisory_xact_lock(db: Session, name: str, *, ahead_of_next_statement: bool = False) -> None:
    """Postgres: wait for the transaction-scoped advisory lock ``name``, held until ``db``'s transaction ends.

    ``ahead_of_next_statement``: where only the transaction's own later statements need the lock (not the
    caller's code, nor other transactions it opens meanwhile), the lock is held back (:func:`write_later`)
    and taken ahead of the next statement, in that statement's round trip."""
    if ahead_of_next_statement:
        write_later(db, _ADVISORY_LOCK, {"k": lock_key(name)})
    else:
        db.execute(_ADVISORY_LOCK, {"k": lock_key(name)})


# SQLite (the embedded mode) has no advisory locks; it is one process, so process locks serialise the same
# way: a fixed set, a name taking the one its key picks (names that share one wait for each other, harmlessly).
_LOCAL_LOCKS = tuple(threading.RLock() for _ in range(64))
_HELD = "steprun_local_locks"


def serialise(db: Session, name: str) -> None:
    """Until ``db``'s transaction ends (commit or rollback), every other transaction serialising on ``name``
    waits here: a count taken after it sees every write made before it by the others.

    Postgres: the advisory lock ``name``. SQLite: a process lock, released when the transaction ends."""
    if db.get_bind().dialect.name == "postgresql":
        advisory_xact_lock(db, name)
        return
    lock = _LOCAL_LOCKS[lock_key(name) % len(_LOCAL_LOCKS)]
    held: list[threading.RLock] = db.info.setdefault(_HELD, [])
    if lock not in held:
        db.connection()  # the transaction has begun: its end, whatever ends it, releases the lock
        lock.acquire()
        held.append(lock)


@event.listens_for(Session, "after_transaction_end")
def _release_local_locks(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction: a savepoint's end keeps them
        for lock in session.info.pop(_HELD, ()):
            lock.release()


def deadlocked(exc: BaseException) -> bool:
    """True if ``exc`` is Postgres failing this transaction to break a deadlock (safe to run again)."""
    return getattr(getattr(exc, "orig", None), "pgcode", None) == "40P01"


def database_unavailable(exc: BaseException) -> bool:
    """True if ``exc`` means the database cannot be reached right now (retry later), not a bug.

    Connection refused or dropped, a server shutting down or starting up, a full
    pool: the API answers 503 with Retry-After, and a worker retries its commit.
    """
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)
