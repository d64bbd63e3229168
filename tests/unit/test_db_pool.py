"""The pool pings a connection only after it sat idle (shared.db.ping_idle_connections)."""
from __future__ import annotations

import time

from sqlalchemy import text

from shared.db import make_engine
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
        # One transaction per unit of work (BEGIN, the statement, ROLLBACK): no ping's transaction before it.
        assert (transactions, queries) == (3, 9), relay.since(before[0])
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
