"""Schedules and delayed turns, against the real database: timing, exactly-once firing, pauses, isolation."""
from __future__ import annotations

import secrets
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update

from shared.auth.principal import SYSTEM, Principal
from shared.clock import aware, utcnow
from shared.db import unit_of_work
from shared.errors import BadInput, NotFound
from shared.models import AgentSession, Schedule, Turn
from shared.runtime import Runtime
from shared.schedules import service as schedules
from shared.schedules.firing import fire_due
from shared.schedules.timing import next_run
from shared.turns import service as turns


def test_cron_runs_in_its_time_zone_across_dst() -> None:
    # Paris springs forward on 2025-03-30 at 02:00: 02:30 does not exist that day.
    after = datetime(2025, 3, 29, 12, 0, tzinfo=timezone.utc)
    first = next_run("30 2 * * *", None, "Europe/Paris", after)
    second = next_run("30 2 * * *", None, "Europe/Paris", first)
    assert first == datetime(2025, 3, 30, 1, 0, tzinfo=timezone.utc)  # 03:00 CEST, the first minute after the gap
    assert second == datetime(2025, 3, 31, 0, 30, tzinfo=timezone.utc)  # 02:30 CEST
    winter = next_run("0 9 * * 1-5", None, "America/New_York", datetime(2025, 1, 3, 15, 0, tzinfo=timezone.utc))
    assert winter == datetime(2025, 1, 6, 14, 0, tzinfo=timezone.utc)  # Monday 09:00 EST


def test_an_interval_keeps_its_phase_and_collapses_missed_runs() -> None:
    slot = datetime(2025, 1, 1, tzinfo=timezone.utc)
    on_time = slot + timedelta(seconds=0.2)
    assert next_run(None, 60, "UTC", on_time, previous=slot) == slot + timedelta(seconds=60)
    later = slot + timedelta(seconds=1000)  # 16 runs were missed: one fires now, the next a period later
    assert next_run(None, 60, "UTC", later, previous=slot) == later + timedelta(seconds=60)


def _schedule(db, rt: Runtime, who: Principal, **body):  # noqa: ANN001, ANN202
    return schedules.create_schedule(db, rt, who, {"agent": "math", "input": "add 1 and 2", **body})


def test_bad_schedules_get_a_400_naming_the_field(rt: Runtime, who: Principal) -> None:
    cases = [({"cron": "* * * *"}, "cron"), ({"cron": "*/1 * * * * *"}, "cron"), ({"cron": "nope"}, "cron"),
             ({"every_seconds": 5}, "every_seconds"), ({"every_seconds": 60.5}, "every_seconds"),
             ({}, "every_seconds"), ({"cron": "* * * * *", "every_seconds": 60}, "cron"),
             ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone"),
             ({"cron": "* * * * *", "agent": "nobody"}, "agent"), ({"cron": "* * * * *", "input": ""}, "input")]
    for body, field in cases:
        with unit_of_work(rt.sessions, who) as db, pytest.raises(BadInput) as err:
            _schedule(db, rt, who, **body)
        assert err.value.field == field, body


def _make_due(rt: Runtime, schedule_id: str, ago: float) -> None:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        db.execute(update(Schedule).where(Schedule.id == schedule_id)
                   .values(next_run_at=utcnow() - timedelta(seconds=ago)))


def _runs(rt: Runtime, who: Principal, schedule_id: str) -> list[Turn]:
    with unit_of_work(rt.sessions, who) as db:
        rows, _ = schedules.list_runs(db, who, schedule_id, 100, None)
        return rows


def test_a_missed_run_fires_once_and_a_second_round_fires_nothing(rt: Runtime, who: Principal) -> None:
    with unit_of_work(rt.sessions, who) as db:
        sid = _schedule(db, rt, who, every_seconds=60).id
    _make_due(rt, sid, ago=600)  # ten periods missed
    fire_due(rt)
    fire_due(rt)  # a second scheduler's round, right after: nothing is due any more
    runs = _runs(rt, who, sid)
    assert len(runs) == 1 and runs[0].schedule_id == sid and runs[0].input == "add 1 and 2"
    with unit_of_work(rt.sessions, who) as db:
        row = schedules.get_schedule(db, who, sid)
        assert row.run_count == 1 and aware(row.next_run_at) > utcnow()
        session = db.get(AgentSession, runs[0].session_id)
        assert session is not None and session.agent == "math" and session.user_id == who.user_id


def test_a_paused_schedule_does_not_fire_and_resuming_does_not_make_up_runs(rt: Runtime, who: Principal) -> None:
    with unit_of_work(rt.sessions, who) as db:
        sid = _schedule(db, rt, who, every_seconds=60).id
        schedules.update_schedule(db, rt, who, sid, {"paused": True})
    _make_due(rt, sid, ago=120)
    fire_due(rt)
    assert _runs(rt, who, sid) == []
    with unit_of_work(rt.sessions, who) as db:
        row = schedules.update_schedule(db, rt, who, sid, {"paused": False})
        assert aware(row.next_run_at) > utcnow() + timedelta(seconds=50)
    fire_due(rt)
    assert _runs(rt, who, sid) == []


def test_runs_go_to_the_schedules_session_when_it_names_one(rt: Runtime, who: Principal) -> None:
    with unit_of_work(rt.sessions, who) as db:
        session_id = turns.create_session(db, rt, who, "math", None).id
        sid = _schedule(db, rt, who, every_seconds=60, session_id=session_id).id
    _make_due(rt, sid, ago=1)
    fire_due(rt)
    assert [r.session_id for r in _runs(rt, who, sid)] == [session_id]


def test_another_user_cannot_see_or_change_a_schedule(rt: Runtime, who: Principal) -> None:
    with unit_of_work(rt.sessions, who) as db:
        sid = _schedule(db, rt, who, cron="0 9 * * *").id
    for other in (Principal(who.tenant_id, "mallory"), Principal("t-other", who.user_id)):
        with unit_of_work(rt.sessions, other) as db:
            assert schedules.list_schedules(db, other, 100, None)[0] == []
            with pytest.raises(NotFound):
                schedules.get_schedule(db, other, sid)
            with pytest.raises(NotFound):
                schedules.update_schedule(db, rt, other, sid, {"paused": True})
            with pytest.raises(NotFound):
                schedules.delete_schedule(db, other, sid)
            with pytest.raises(NotFound):
                schedules.list_runs(db, other, sid, 10, None)
    with unit_of_work(rt.sessions, who) as db:
        assert schedules.get_schedule(db, who, sid).paused is False


def test_a_delayed_turn_waits_without_taking_the_session(rt: Runtime, who: Principal) -> None:
    with unit_of_work(rt.sessions, who) as db:
        session_id = turns.create_session(db, rt, who, "math", None).id
        later, _ = turns.create_turn(db, rt, who, session_id, "add 1 and 2", after_seconds=3600)
        later_id = later.id
        assert later.status == "queued" and later.scheduled_at is not None
    with unit_of_work(rt.sessions, who) as db:
        assert db.get(AgentSession, session_id).active_turn_id is None  # type: ignore[union-attr]  # it exists
        now_turn, _ = turns.create_turn(db, rt, who, session_id, "add 2 and 3")  # runs at once, not behind it
        assert db.get(AgentSession, session_id).active_turn_id == now_turn.id  # type: ignore[union-attr]  # idem
    fire_due(rt)
    with unit_of_work(rt.sessions, who) as db:
        assert db.get(Turn, later_id).status == "queued"  # type: ignore[union-attr]  # still waiting for its time
        cancelled = turns.cancel_turn(db, rt, who, later_id)
        assert cancelled.status == "cancelled"


def test_a_due_delayed_turn_takes_an_idle_session(rt: Runtime, who: Principal) -> None:
    with unit_of_work(rt.sessions, who) as db:
        session_id = turns.create_session(db, rt, who, "math", None).id
        turn_id = turns.create_turn(db, rt, who, session_id, "add 1 and 2", after_seconds=60)[0].id
    with unit_of_work(rt.sessions, SYSTEM) as db:
        db.execute(update(Turn).where(Turn.id == turn_id).values(scheduled_at=utcnow() - timedelta(seconds=1)))
    assert fire_due(rt).delayed_started >= 1
    with unit_of_work(rt.sessions, who) as db:
        assert db.scalar(select(AgentSession.active_turn_id).where(AgentSession.id == session_id)) == turn_id


@pytest.mark.parametrize("body, field", [
    ({"after_seconds": -1}, "after_seconds"), ({"after_seconds": "10"}, "after_seconds"),
    ({"after_seconds": True}, "after_seconds"), ({"at": "2030-01-01T00:00:00"}, "at"),
    ({"at": "yesterday"}, "at"), ({"at": "2001-01-01T00:00:00Z"}, "at"),
    ({"at": "2099-01-01T00:00:00Z", "after_seconds": 5}, "at"), ({"after_seconds": 5, "on_busy": "reject"}, "on_busy"),
])
def test_bad_delays_get_a_400(rt: Runtime, who: Principal, body: dict, field: str) -> None:
    with unit_of_work(rt.sessions, who) as db:
        session_id = turns.create_session(db, rt, who, "math", None).id
    with unit_of_work(rt.sessions, who) as db, pytest.raises(BadInput) as err:
        turns.create_turn(db, rt, who, session_id, "hi", body.pop("on_busy", None), **body)
    assert err.value.field == field


def test_at_with_an_offset_is_read_as_that_instant(rt: Runtime, who: Principal) -> None:
    when = (utcnow() + timedelta(hours=2)).astimezone(timezone(timedelta(hours=5, minutes=30)))
    with unit_of_work(rt.sessions, who) as db:
        session_id = turns.create_session(db, rt, who, "math", None).id
        turn, _ = turns.create_turn(db, rt, who, session_id, "hi", at=when.isoformat(),
                                    idempotency_key=secrets.token_hex(4))
        assert abs((aware(turn.scheduled_at) - when).total_seconds()) < 1e-3  # type: ignore[arg-type]  # set
