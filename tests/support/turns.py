"""Starting turns in tests: in-process (:func:`start_turn`) or over HTTP, polled to its end (:func:`polled_turn`)."""
from __future__ import annotations

import requests

from shared.auth.principal import Principal
from shared.db import unit_of_work
from shared.runtime import Runtime
from shared.turns import service as turns


def start_turn(rt: Runtime, who: Principal, agent: str, text: str) -> tuple[str, str]:
    """(session id, turn id) of a new session with one queued turn."""
    with unit_of_work(rt.sessions, who) as db:
        session = turns.create_session(db, rt, who, agent, None)
        turn, _ = turns.create_turn(db, rt, who, session.id, text)
        return session.id, turn.id


def polled_turn(url: str, headers: dict[str, str], session_id: str, text: str) -> dict:
    """POST a turn, then long-poll ``GET /v1/turns/{id}?wait=`` until it stops running; the turn as last read."""
    r = requests.post(f"{url}/v1/sessions/{session_id}/turns", json={"input": text}, headers=headers, timeout=30)
    assert r.status_code == 202, r.text
    turn = r.json()
    for _ in range(10):
        turn = requests.get(f"{url}/v1/turns/{turn['id']}?wait=30", headers=headers, timeout=60).json()
        if turn["status"] not in ("queued", "in_progress"):
            break
    return turn
