"""End to end over real HTTP, against both deployment shapes (Procfile processes, and `steprun dev`)."""
from __future__ import annotations

import json
import secrets

import requests

from tests.support.processes import Stack


def _session(stack: Stack, agent: str = "math", key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key or stack.key}"}
    r = requests.post(f"{stack.url}/v1/sessions", json={"agent": agent, "metadata": {"k": "v"}}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def _turn(stack: Stack, session_id: str, text: str, **extra) -> requests.Response:
    return requests.post(f"{stack.url}/v1/sessions/{session_id}/turns", json={"input": text},
                         headers=stack.headers(**extra))


def test_multi_step_tool_turn_completes_and_history_reads_back(stack: Stack) -> None:
    session = _session(stack)
    r = _turn(stack, session["id"], "please add 20 and 22")
    assert r.status_code == 202, r.text
    turn = r.json()
    assert turn["status"] in ("queued", "in_progress") and turn["session_id"] == session["id"]

    done = requests.get(f"{stack.url}/v1/turns/{turn['id']}?wait=30", headers=stack.headers()).json()
    assert done["status"] == "completed", done
    assert done["output"] == "The result of add is 42."
    assert done["steps"] == 2 and done["usage"]["output_tokens"] > 0
    assert done["started_at"] and done["finished_at"]

    history = requests.get(f"{stack.url}/v1/sessions/{session['id']}/messages", headers=stack.headers()).json()
    roles = [(m["role"], m["content"]) for m in history["data"]]
    assert roles[0] == ("user", "please add 20 and 22")
    assert history["data"][1]["tool_calls"][0]["function"]["name"] == "add"
    assert roles[2] == ("tool", "42")
    assert roles[3] == ("assistant", "The result of add is 42.")

    events = requests.get(f"{stack.url}/v1/sessions/{session['id']}/events", headers=stack.headers()).json()
    types = [e["type"] for e in events["data"]]
    assert types[0] == "turn.queued" and types[-1] == "turn.completed"
    assert "tool.call" in types and "tool.result" in types and types.count("step.completed") == 2
    cursors = [e["cursor"] for e in events["data"]]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
    deltas = "".join(e["data"]["text"] for e in events["data"] if e["type"] == "message.delta")
    assert deltas == done["output"]

    # Resuming from a cursor returns exactly what came after it.
    mid = cursors[2]
    later = requests.get(f"{stack.url}/v1/sessions/{session['id']}/events?after={mid}", headers=stack.headers()).json()
    assert [e["cursor"] for e in later["data"]] == cursors[3:]
    assert later["next"] == cursors[-1]


def test_long_poll_events_wakes_on_new_event(stack: Stack) -> None:
    session = _session(stack, "echo")
    head = requests.get(f"{stack.url}/v1/sessions/{session['id']}/events", headers=stack.headers()).json()
    assert head == {"data": [], "next": 0}
    turn = _turn(stack, session["id"], "hello there").json()
    r = requests.get(f"{stack.url}/v1/sessions/{session['id']}/events?after=0&wait=10", headers=stack.headers())
    assert r.status_code == 200 and r.json()["data"], r.text
    requests.get(f"{stack.url}/v1/turns/{turn['id']}?wait=30", headers=stack.headers())


def test_idempotency_key_yields_one_turn(stack: Stack) -> None:
    session = _session(stack, "echo")
    key = secrets.token_hex(8)
    first = _turn(stack, session["id"], "once", **{"Idempotency-Key": key})
    second = _turn(stack, session["id"], "once", **{"Idempotency-Key": key})
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    reused = _turn(stack, session["id"], "something else", **{"Idempotency-Key": key})
    assert reused.status_code == 409 and reused.json()["error"]["field"] == "Idempotency-Key"
    requests.get(f"{stack.url}/v1/turns/{first.json()['id']}?wait=30", headers=stack.headers())
    history = requests.get(f"{stack.url}/v1/sessions/{session['id']}/messages", headers=stack.headers()).json()
    assert [m["content"] for m in history["data"] if m["role"] == "user"] == ["once"]


def test_on_busy_reject_and_enqueue(stack: Stack) -> None:
    session = _session(stack, "echo")
    first = _turn(stack, session["id"], "first").json()
    rejected = requests.post(f"{stack.url}/v1/sessions/{session['id']}/turns",
                             json={"input": "second", "on_busy": "reject"}, headers=stack.headers())
    if rejected.status_code == 202:  # the first turn already finished: nothing to reject against
        requests.get(f"{stack.url}/v1/turns/{rejected.json()['id']}?wait=30", headers=stack.headers())
    else:
        assert rejected.status_code == 409, rejected.text
        assert first["id"] in rejected.json()["error"]["message"]
    queued = _turn(stack, session["id"], "third").json()
    done = requests.get(f"{stack.url}/v1/turns/{queued['id']}?wait=30", headers=stack.headers()).json()
    assert done["status"] == "completed" and done["output"].startswith("You said: third")
    first_done = requests.get(f"{stack.url}/v1/turns/{first['id']}", headers=stack.headers()).json()
    assert first_done["status"] == "completed"
    assert first_done["finished_at"] <= done["started_at"]  # one turn at a time per session


def test_cancel_is_idempotent_and_keeps_partial_output(stack: Stack) -> None:
    session = _session(stack, "echo")
    turn = _turn(stack, session["id"], "talk for a while").json()
    # Wait until the model streams, then cancel.
    events = requests.get(f"{stack.url}/v1/sessions/{session['id']}/events?after=0&wait=10",
                          headers=stack.headers()).json()
    assert events["data"]
    c1 = requests.post(f"{stack.url}/v1/turns/{turn['id']}/cancel", headers=stack.headers())
    assert c1.status_code == 200, c1.text
    done = requests.get(f"{stack.url}/v1/turns/{turn['id']}?wait=30", headers=stack.headers()).json()
    assert done["status"] == "cancelled", done
    c2 = requests.post(f"{stack.url}/v1/turns/{turn['id']}/cancel", headers=stack.headers())
    assert c2.status_code == 200 and c2.json()["status"] == "cancelled"


def test_bad_input_gets_clear_4xx_and_writes_nothing(stack: Stack) -> None:
    key = stack.new_user_key()  # a user with nothing yet, so "nothing was written" is checkable
    h = {"Authorization": f"Bearer {key}"}
    url = stack.url
    assert requests.get(f"{url}/v1/sessions", headers={}).status_code == 401
    bad_key = requests.get(f"{url}/v1/sessions", headers={"Authorization": "Bearer sr_nope"})
    assert bad_key.status_code == 401 and bad_key.json()["error"]["code"] == "unauthorized"

    r = requests.post(f"{url}/v1/sessions", data="{not json", headers=h)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = requests.post(f"{url}/v1/sessions", json=["a list"], headers=h)
    assert r.status_code == 400
    r = requests.post(f"{url}/v1/sessions", json={"agent": "nope"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["field"] == "agent" and "nope" in r.json()["error"]["message"]
    r = requests.post(f"{url}/v1/sessions", json={}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["field"] == "agent"
    r = requests.post(f"{url}/v1/sessions", json={"agent": "math", "metadata": "x"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["field"] == "metadata"
    assert requests.get(f"{url}/v1/sessions", headers=h).json()["data"] == []  # nothing was written

    session = _session(stack, key=key)
    sid = session["id"]
    for body, field in [({}, "input"), ({"input": ""}, "input"), ({"input": 5}, "input"),
                        ({"input": "x", "on_busy": "sometimes"}, "on_busy")]:
        r = requests.post(f"{url}/v1/sessions/{sid}/turns", json=body, headers=h)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (body, r.text)
    r = requests.post(f"{url}/v1/sessions/{sid}/turns", json={"input": "x" * 100_001}, headers=h)
    assert r.status_code == 413 and r.json()["error"]["field"] == "input"
    r = requests.post(f"{url}/v1/sessions/{sid}/turns", data=json.dumps({"input": "y" * 2_000_000}), headers=h)
    assert r.status_code == 413
    assert requests.get(f"{url}/v1/sessions/{sid}/messages", headers=h).json()["data"] == []

    # A missing session, and another user's session: both 404, indistinguishable.
    r = requests.post(f"{url}/v1/sessions/ses_missing/turns", json={"input": "hi"}, headers=h)
    assert r.status_code == 404
    other = stack.new_user_key()
    r = requests.post(f"{url}/v1/sessions/{sid}/turns", json={"input": "hi"},
                      headers={"Authorization": f"Bearer {other}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert requests.get(f"{url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {other}"}).status_code == 404
    r = requests.get(f"{url}/v1/sessions/{sid}/events?after=abc", headers=h)
    assert r.status_code == 400 and r.json()["error"]["field"] == "after"
    r = requests.get(f"{url}/v1/turns/turn_missing?wait=-1", headers=h)
    assert r.status_code == 400


def test_sessions_list_paginates_and_delete_removes(stack: Stack) -> None:
    key = stack.new_user_key()
    h = {"Authorization": f"Bearer {key}"}
    ids = [_session(stack, "echo", key=key)["id"] for _ in range(3)]
    page1 = requests.get(f"{stack.url}/v1/sessions?limit=2", headers=h).json()
    assert len(page1["data"]) == 2 and page1["next"]
    page2 = requests.get(f"{stack.url}/v1/sessions?limit=2&after={page1['next']}", headers=h).json()
    assert page2["next"] is None
    seen = [s["id"] for s in page1["data"] + page2["data"]]
    assert sorted(seen) == sorted(ids) and len(set(seen)) == 3
    assert requests.delete(f"{stack.url}/v1/sessions/{ids[0]}", headers=h).status_code == 200
    assert requests.get(f"{stack.url}/v1/sessions/{ids[0]}", headers=h).status_code == 404
    assert requests.get(f"{stack.url}/v1/sessions/{ids[0]}/messages", headers=h).status_code == 404


def test_agents_and_health(stack: Stack) -> None:
    agents = requests.get(f"{stack.url}/v1/agents", headers=stack.headers()).json()["data"]
    math = next(a for a in agents if a["name"] == "math")
    assert {t["name"] for t in math["tools"]} >= {"add", "multiply"}
    assert math["tools"][0]["parameters"]["properties"]["a"]["type"] == "integer"
    assert requests.get(f"{stack.url}/readyz").json()["status"] == "ready"
