"""Writes held for the transaction's next statement or its commit (shared.db.write_later), and the
transaction's BEGIN sent with its first statement (shared.db.pipeline_transactions).

On Postgres a held write is bound at once and sent, with the others held, in
the round trip of whatever the transaction runs next (or of its COMMIT): the
order of the statements is unchanged, so a read after it sees it; a rollback
drops it; an error it raises is raised by that next statement or by the commit,
wrapped as SQLAlchemy wraps a statement's (so the API's 503 and the worker's
commit retry see what they always saw). On SQLite it runs at once. The relay in
front of Postgres counts the round trips (tests/support/pg_counter.py).
"""
from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    func,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, sessionmaker

from shared.db import database_unavailable, make_engine, make_sessionmaker, unit_of_work, write_later
from shared.settings import Settings
from tests.support.pg_counter import PgCounter

_metadata = MetaData()
ROWS = Table(
    f"held_writes_{secrets.token_hex(3)}", _metadata,
    Column("id", String(20), primary_key=True),
    Column("n", Integer, nullable=False),
    Column("body", JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")),
    Column("at", DateTime(timezone=True)),
    Column("note", Text, default="(none)"),
)
INSERT = ROWS.insert()
BUMP = update(ROWS).where(ROWS.c.id == bindparam("p_id")).values(n=ROWS.c.n + bindparam("p_by"))
COUNT = select(func.count()).select_from(ROWS)


@dataclass
class Db:
    sessions: sessionmaker[Session]
    relay: PgCounter | None

    def round_trips(self) -> int:
        assert self.relay is not None
        return self.relay.counts()[1]


@pytest.fixture
def pg(settings: Settings) -> Iterator[Db]:
    relay = PgCounter(settings.database_url or "")
    engine = make_engine(Settings(database_url=relay.url, db_pool_size=1, db_max_overflow=0))
    _metadata.create_all(engine)
    try:
        yield Db(make_sessionmaker(engine), relay)
    finally:
        _metadata.drop_all(engine)
        engine.dispose()
        relay.close()


def _rows(db: Db) -> list[Any]:
    with unit_of_work(db.sessions) as s:
        return list(s.execute(select(ROWS).order_by(ROWS.c.id)).all())


def test_held_writes_go_in_one_round_trip_before_the_next_statement_which_sees_them(pg: Db) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)
    with unit_of_work(pg.sessions) as s:
        s.execute(COUNT)  # the transaction has begun
        before = pg.round_trips()
        write_later(s, INSERT, [{"id": "a", "n": 1, "body": {"text": "100% 'sure'; or not"}, "at": at},
                                {"id": "b", "n": 2, "body": None, "at": None}])
        write_later(s, BUMP, {"p_id": "a", "p_by": 10})  # after the insert, as it was called
        assert pg.round_trips() == before  # nothing sent yet
        assert s.execute(COUNT).scalar_one() == 2
        assert pg.round_trips() == before + 1  # the three held writes, and the count after them
    rows = _rows(pg)
    assert [(r.id, r.n, r.body, r.at, r.note) for r in rows] == [
        ("a", 11, {"text": "100% 'sure'; or not"}, at, "(none)"),  # the column's Python default filled in
        ("b", 2, None, None, "(none)"),
    ]
    with unit_of_work(pg.sessions) as s:  # JSON None as SQL NULL, as the column says (not JSON 'null')
        assert s.execute(select(ROWS.c.id).where(ROWS.c.body.is_(None))).scalars().all() == ["b"]


def test_writes_held_at_the_end_go_with_the_commit(pg: Db) -> None:
    with unit_of_work(pg.sessions) as s:
        s.execute(COUNT)
        before = pg.round_trips()
        write_later(s, INSERT, {"id": "c", "n": 3})
        write_later(s, BUMP, {"p_id": "c", "p_by": 1})
    assert pg.round_trips() == before + 1  # the held writes, then COMMIT
    assert [(r.id, r.n) for r in _rows(pg)] == [("c", 4)]


def test_a_rollback_drops_the_held_writes_and_the_next_transaction_does_not_send_them(pg: Db) -> None:
    with pytest.raises(RuntimeError), unit_of_work(pg.sessions) as s:
        write_later(s, INSERT, {"id": "d", "n": 4})
        raise RuntimeError("the block failed")
    with unit_of_work(pg.sessions) as s:  # the same pooled connection (the pool holds one)
        write_later(s, INSERT, {"id": "e", "n": 5})
    assert [r.id for r in _rows(pg)] == ["e"]


def test_a_held_write_that_fails_fails_the_next_statement_or_the_commit_as_a_statement_would(pg: Db) -> None:
    with unit_of_work(pg.sessions) as s:
        write_later(s, INSERT, {"id": "f", "n": 6, "body": {"secret": "user words"}})
    with pytest.raises(sa_exc.IntegrityError) as failed, unit_of_work(pg.sessions) as s:
        write_later(s, INSERT, {"id": "f", "n": 7, "body": {"secret": "user words"}})
        s.execute(COUNT)
    assert "user words" not in str(failed.value)  # the held values are not in the error
    with pytest.raises(sa_exc.IntegrityError) as failed, unit_of_work(pg.sessions) as s:
        write_later(s, INSERT, {"id": "f", "n": 8, "body": {"secret": "user words"}})
    assert "user words" not in str(failed.value)
    assert [(r.id, r.n) for r in _rows(pg)] == [("f", 6)]  # both rolled back
    assert not database_unavailable(failed.value)  # a bug, not an outage: the commit is not retried


def test_a_held_write_runs_at_once_on_sqlite(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/held.db"
    engine = make_engine(Settings(database_url=url, data_dir=str(tmp_path)))
    _metadata.create_all(engine)
    db = Db(make_sessionmaker(engine), None)
    try:
        with unit_of_work(db.sessions) as s:
            write_later(s, INSERT, [{"id": "g", "n": 1}, {"id": "h", "n": 2}])
            write_later(s, BUMP, {"p_id": "g", "p_by": 1})
            assert s.execute(select(ROWS.c.n).where(ROWS.c.id == "g")).scalar_one() == 2
        with pytest.raises(sa_exc.IntegrityError), unit_of_work(db.sessions) as s:
            write_later(s, INSERT, {"id": "g", "n": 3})  # raised here, at once
            raise AssertionError("not reached")
        assert [(r.id, r.n, r.note) for r in _rows(db)] == [("g", 2, "(none)"), ("h", 2, "(none)")]
    finally:
        engine.dispose()


def test_begin_goes_with_the_first_statement_and_a_transaction_that_ran_nothing_sends_nothing(pg: Db) -> None:
    assert pg.relay is not None
    transactions, before = pg.relay.counts()
    with unit_of_work(pg.sessions) as s:
        s.execute(COUNT)  # BEGIN;SELECT …
        s.execute(COUNT)
    assert pg.relay.counts() == (transactions + 1, before + 3)  # the two statements, COMMIT
    with unit_of_work(pg.sessions) as s:
        s.connection()  # begun, and nothing run
    assert pg.relay.counts() == (transactions + 1, before + 3)
    with unit_of_work(pg.sessions) as s:
        write_later(s, INSERT, {"id": "i", "n": 9})
    assert pg.relay.counts() == (transactions + 2, before + 4)  # BEGIN;INSERT …;COMMIT
    assert [r.id for r in _rows(pg)] == ["i"]


def test_a_failed_statement_rolls_back_what_went_ahead_of_it_and_names_only_itself(pg: Db) -> None:
    with pytest.raises(sa_exc.DataError) as failed, unit_of_work(pg.sessions) as s:
        write_later(s, INSERT, {"id": "j", "n": 10, "body": {"secret": "user words"}})
        s.execute(text("SELECT 1 / :zero"), {"zero": 0})
    assert "user words" not in str(failed.value) and "INSERT" not in str(failed.value)
    assert "SELECT 1 / %(zero)s" in str(failed.value)
    assert _rows(pg) == []
    with unit_of_work(pg.sessions) as s:  # the same connection, in a transaction of its own again
        assert s.execute(text("SELECT txid_current_if_assigned() IS NULL")).scalar_one() is True


def test_percent_signs_ahead_of_a_statement_survive_with_and_without_its_parameters(pg: Db) -> None:
    with unit_of_work(pg.sessions) as s:
        write_later(s, INSERT, {"id": "k", "n": 11, "note": "50% off"})
        assert s.execute(text("SELECT '100%' || :x"), {"x": "!"}).scalar_one() == "100%!"
        write_later(s, INSERT, {"id": "l", "n": 12, "note": "%(x)s %s"})
        assert s.connection().exec_driver_sql("SELECT '5%%'").scalar_one() == "5%"  # interpolated, if empty
        write_later(s, INSERT, {"id": "m", "n": 13, "note": "100%"})
        assert s.connection().execution_options(no_parameters=True).exec_driver_sql("SELECT '5%'").scalar_one() == "5%"
    assert [(r.id, r.note) for r in _rows(pg)] == [("k", "50% off"), ("l", "%(x)s %s"), ("m", "100%")]


def test_a_connection_taken_raw_keeps_the_drivers_own_transactions(pg: Db) -> None:
    with unit_of_work(pg.sessions) as s:
        s.execute(COUNT)
        assert s.connection().connection.dbapi_connection.autocommit is True  # type: ignore[union-attr]
    engine = pg.sessions.kw["bind"]
    raw = engine.raw_connection()  # the same pooled connection (the pool holds one)
    try:
        assert raw.dbapi_connection.autocommit is False
        cur = raw.cursor()
        cur.execute(f"INSERT INTO {ROWS.name} (id, n, note) VALUES ('n', 14, 'x')")
        raw.rollback()
    finally:
        raw.close()
    assert _rows(pg) == []
