"""The pool pings a connection only after it sat idle (shared.db.ping_idle_connections)."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy import exc as sa_exc

from shared.db import make_engine
from shared.pool import LingeringQueuePool
from shared.settings import Settings
from tests.support.pg_counter import PgCounter


def test_connection_in_steady_use_is_not_pinged(settings: Settings) -> None:
    relay = PgCounter(settings.database_url or "")  # counts what reaches the server
    engine = make_engine(Settings(database_url=relay.url, db_pool_size=1, db_max_overflow=0,
                                  db_ping_idle_seconds=30.0))
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        before = relay.settle(quiet=0.2)
        for _ in range(3):
            with engine.connect() as conn:
                assert conn.execute(text("SELECT pg_backend_pid()")).scalar() == pid
        transactions, queries = (a - b for a, b in zip(relay.settle(quiet=0.2), before, strict=True))
        # One transaction per unit of work (the statement with BEGIN ahead of it, then ROLLBACK): no ping's
        # transaction before it.
        assert (transactions, queries) == (3, 6), relay.since(before[0])
    finally:
        engine.dispose()
        relay.close()


def test_idle_connection_that_died_is_replaced(settings: Settings) -> None:
    engine = make_engine(Settings(database_url=settings.database_url, db_pool_size=1, db_max_overflow=0,
                                  db_ping_idle_seconds=0.2))
    admin = make_engine(Settings(database_url=settings.database_url))
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with admin.connect() as conn:  # the server cut it while it sat in the pool (a restart, an idle timeout)
            assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
            conn.commit()
        time.sleep(0.4)
        with engine.connect() as conn:  # pinged, found dead, replaced: the caller never sees the error
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
    finally:
        engine.dispose()
        admin.dispose()


def _busy(engine: Engine, n: int) -> list[int]:
    """Check out ``n`` connections at once and return them: their backends' pids."""
    conns = [engine.connect() for _ in range(n)]
    try:
        return [c.execute(text("SELECT pg_backend_pid()")).scalar() for c in conns]
    finally:
        for c in conns:
            c.close()


def test_a_bursts_extra_connections_stay_while_it_lasts_then_go(settings: Settings) -> None:
    """Overflow connections are not closed on return while the pool keeps needing them (shared/pool.py)."""
    engine = make_engine(Settings(database_url=settings.database_url, db_pool_size=2, db_max_overflow=3))
    pool = engine.pool
    assert isinstance(pool, LingeringQueuePool)
    closed: list[object] = []
    event.listen(pool, "close", lambda conn, record: closed.append(conn))
    try:
        first = set(_busy(engine, 5))
        for _ in range(3):  # the burst goes on: the same five backends serve it, none opened anew
            assert set(_busy(engine, 5)) == first
        assert closed == [] and pool.checkedin() == 5
        with pytest.raises(sa_exc.TimeoutError):  # the limit is still pool_size + max_overflow
            pool._timeout = 0.2
            _busy(engine, 6)
        assert pool.checkedin() == 5
        pool.linger = 0.0  # as if the pool had been quiet since: returning closes down to pool_size
        time.sleep(0.01)
        for _ in range(5):
            _busy(engine, 1)
        assert len(closed) == 3 and pool.checkedin() == 2
        engine.dispose()  # a recreated pool keeps the same limits
        assert isinstance(engine.pool, LingeringQueuePool) and engine.pool.keep == 2
        assert len(set(_busy(engine, 5))) == 5
    finally:
        engine.dispose()
