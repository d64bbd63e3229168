"""Writes held for the transaction's next statement or its commit (shared.db.write_later).

On Postgres a held write is bound at once and sent, with the others held, in
one round trip before whatever the transaction runs next: the order of the
statements is unchanged, so a read after it sees it; a rollback drops it; an
error it raises is raised by that next statement or by the commit, wrapped as
SQLAlchemy wraps a statement's (so the API's 503 and the worker's commit retry
see what they always saw). On SQLite it runs at once. The relay in front of
Postgres counts the round trips (tests/support/pg_counter.py).
"""
from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table, Text, bindparam, func, select, update
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
        assert pg.round_trips() == before + 2  # the three held writes, then the count
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
    assert pg.round_trips() == before + 2  # the held writes, then COMMIT
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
    assert "user words" not in str(failed.value) and "held for the commit" in str(failed.value)
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
