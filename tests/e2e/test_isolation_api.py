"""Another user, of the same tenant or another one, gets 404 for everything of A's, on every route."""
from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import requests
import websocket

from tests.support.processes import Stack, create_key_cli


@pytest.fixture(scope="module")
def a_and_bs(stack: Stack):  # noqa: ANN201
    tenant = f"t-{secrets.token_hex(4)}"
    cwd = Path(stack.env.get("_STEPRUN_CWD", "."))
    a = create_key_cli(stack.env, tenant, "alice", cwd=cwd)
    same_tenant = create_key_cli(stack.env, tenant, "bob", cwd=cwd)
    other_tenant = create_key_cli(stack.env, f"t-{secrets.token_hex(4)}", "alice", cwd=cwd)
    h = {"Authorization": f"Bearer {a}"}
    sid = requests.post(f"{stack.url}/v1/sessions", json={"agent": "bank", "metadata": {"secret": "A-only"}},
                        headers=h).json()["id"]
    done = requests.post(f"{stack.url}/v1/sessions/{sid}/turns", json={"input": "add 1 and 2"}, headers=h).json()
    requests.get(f"{stack.url}/v1/turns/{done['id']}?wait=30", headers=h)
    # A second turn pauses for approval, so resume is a live target too.
    paused = requests.post(f"{stack.url}/v1/sessions/{sid}/turns", json={"input": "transfer 5 to carol"},
                           headers=h).json()
    status = requests.get(f"{stack.url}/v1/turns/{paused['id']}?wait=30", headers=h).json()["status"]
    assert status == "requires_action"
    doc = requests.post(f"{stack.url}/v1/knowledge", json={"title": "A-only notes", "text": "zebrafinch A-only"},
                        headers=h)
    assert doc.status_code == 201, doc.text
    assert requests.put(f"{stack.url}/v1/memory/prefs/colour", json={"value": "A-only teal"},
                        headers=h).status_code in (200, 201)
    stack.a_doc_id = doc.json()["id"]  # type: ignore[attr-defined]
    return stack, h, sid, done["id"], paused["id"], [same_tenant, other_tenant]


def test_every_route_answers_404_to_another_user(a_and_bs) -> None:  # noqa: ANN001
    stack, a_headers, sid, tid, paused_tid, intruders = a_and_bs
    u = stack.url
    probes = [
        ("GET", f"/v1/sessions/{sid}", None),
        ("GET", f"/v1/sessions/{sid}/messages", None),
        ("GET", f"/v1/sessions/{sid}/events?after=0", None),
        ("GET", f"/v1/sessions/{sid}/events?after=0&wait=1", None),
        ("POST", f"/v1/sessions/{sid}/turns", {"input": "hijack"}),
        ("GET", f"/v1/turns/{tid}", None),
        ("GET", f"/v1/turns/{tid}?wait=1", None),
        ("POST", f"/v1/turns/{paused_tid}/cancel", None),
        ("POST", f"/v1/turns/{paused_tid}/resume", {"approve": True}),
        ("GET", f"/v1/sessions/{sid}/events/stream?after=0", None),
        ("POST", f"/v1/sessions/{sid}/stream-token", None),
        ("GET", f"/v1/sessions/{sid}/export", None),
        ("GET", f"/v1/turns/{tid}/trace", None),
        ("GET", f"/v1/knowledge/{stack.a_doc_id}", None),
        ("DELETE", f"/v1/knowledge/{stack.a_doc_id}", None),
        ("GET", "/v1/memory/prefs/colour", None),
        ("DELETE", f"/v1/sessions/{sid}", None),
    ]
    for key in intruders:
        h = {"Authorization": f"Bearer {key}"}
        for method, path, body in probes:
            r = requests.request(method, u + path, json=body, headers=h, timeout=10)
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "not_found"
            assert "A-only" not in r.text and "carol" not in r.text
        listed = requests.get(f"{u}/v1/sessions", headers=h).json()
        assert sid not in {s["id"] for s in listed["data"]}
        for path in ("/v1/knowledge/search?q=zebrafinch", "/v1/knowledge", "/v1/memory?q=teal", "/v1/memory"):
            r = requests.get(u + path, headers=h)
            assert r.status_code == 200 and "A-only" not in r.text, (path, r.text)
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(f"{u.replace('http', 'ws')}/v1/sessions/{sid}/ws?after=0",
                                        header=[f"Authorization: Bearer {key}"], timeout=5)
        assert refused.value.status_code == 404

    # A's data is untouched: the paused turn is still paused, the session still there.
    assert requests.get(f"{u}/v1/knowledge/{stack.a_doc_id}", headers=a_headers).status_code == 200
    assert requests.get(f"{u}/v1/memory/prefs/colour", headers=a_headers).json()["value"] == "A-only teal"
    assert requests.get(f"{u}/v1/sessions/{sid}", headers=a_headers).json()["metadata"] == {"secret": "A-only"}
    assert requests.get(f"{u}/v1/turns/{paused_tid}", headers=a_headers).json()["status"] == "requires_action"
    assert len(requests.get(f"{u}/v1/sessions/{sid}/messages", headers=a_headers).json()["data"]) >= 4


def test_ids_are_unguessable(a_and_bs) -> None:  # noqa: ANN001
    _, _, sid, tid, _, _ = a_and_bs
    assert sid.startswith("ses_") and len(sid) == 28
    assert tid.startswith("turn_") and len(tid) == 29
