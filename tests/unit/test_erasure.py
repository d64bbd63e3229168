"""Erasure is final: a step's memory writes are fenced on its turn, which the erase locks and deletes.

In this process, on the real Postgres (a tool still running when its user erases their data, against
the real worker: tests/e2e/test_credentials.py).
"""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select

from shared.auth.principal import SYSTEM, Principal
from shared.db import unit_of_work
from shared.engine.claim import Claim
from shared.engine.outcome import StepInterrupted
from shared.engine.tools import _fence_for
from shared.models import MemoryItem
from shared.runtime import Runtime
from shared.storage.memory import MemoryStore, put_item
from shared.turns import service
from shared.turns.history import erase_user


def _claim(rt: Runtime, who: Principal) -> Claim:
    with unit_of_work(rt.sessions, who) as db:
        session = service.create_session(db, rt, who, "echo", None)
        turn, _ = service.create_turn(db, rt, who, session.id, "hello", None, None)
        return Claim(turn.id, session.id, 0, turn.attempt, 1, who)


def _memory(rt: Runtime, who: Principal) -> int:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        return int(db.scalar(select(func.count()).select_from(MemoryItem).where(
            MemoryItem.tenant_id == who.tenant_id, MemoryItem.user_id == who.user_id)) or 0)


def test_a_tool_memory_write_after_the_erase_is_refused(rt: Runtime, who: Principal) -> None:
    claim = _claim(rt, who)
    store = MemoryStore(rt.sessions, rt.settings, who, _fence_for(claim))
    store.put("notes", "before", 1)
    with unit_of_work(rt.sessions, who) as db:
        assert erase_user(db, rt, who).memory_items == 1
    with pytest.raises(StepInterrupted):
        store.put("notes", "after", 2)
    with pytest.raises(StepInterrupted):
        store.delete("notes", "before")
    assert _memory(rt, who) == 0
    # Memory the user writes through the API after the erase (no turn, no fence) is theirs again.
    MemoryStore(rt.sessions, rt.settings, who).put("notes", "new", 3)
    assert _memory(rt, who) == 1


def test_a_write_in_flight_when_the_erase_starts_is_erased_with_the_rest(rt: Runtime, who: Principal) -> None:
    claim = _claim(rt, who)
    writer = rt.sessions()
    writer.info["scope"] = who
    _fence_for(claim)(writer)  # holds the turn's share lock until the writer commits
    put_item(writer, rt.settings, who, "notes", "racing", 1)
    done = threading.Event()

    def erase() -> None:
        with unit_of_work(rt.sessions, who) as db:
            erase_user(db, rt, who)
        done.set()

    eraser = threading.Thread(target=erase)
    eraser.start()
    time.sleep(0.5)
    assert not done.is_set()  # the erase waits for the write that holds the turn
    writer.commit()
    writer.close()
    eraser.join(10)
    assert done.is_set() and _memory(rt, who) == 0
