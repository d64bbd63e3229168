"""Memory, knowledge, traces, metrics, export and erasure over real HTTP, in both deployment shapes."""
from __future__ import annotations

import re
import secrets
import subprocess
from pathlib import Path

import requests
from sqlalchemy import create_engine, text

from shared.runtime import Runtime
from tests.support.processes import BIN, ROOT, Stack, create_key_cli

REFUNDS = """# Returns policy

## Refund window

Refunds are issued within 14 days of receiving the returned parcel.

## Exchanges

Exchanges are free for members of the loyalty club.
"""


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _ask(stack: Stack, key: str, text_: str, agent: str = "assistant", session_id: str | None = None) -> dict:
    """Run one turn to its end and return it."""
    if session_id is None:
        r = requests.post(f"{stack.url}/v1/sessions", json={"agent": agent}, headers=_h(key))
        assert r.status_code == 201, r.text
        session_id = r.json()["id"]
    r = requests.post(f"{stack.url}/v1/sessions/{session_id}/turns", json={"input": text_}, headers=_h(key))
    assert r.status_code == 202, r.text
    done = requests.get(f"{stack.url}/v1/turns/{r.json()['id']}?wait=30", headers=_h(key)).json()
    assert done["status"] == "completed", done
    return done


def _db(stack: Stack, rt: Runtime):  # type: ignore[no-untyped-def]
    """The database the stack writes to: the test Postgres, or the embedded SQLite file."""
    if stack.mode == "production":
        return rt.engine
    return create_engine(f"sqlite:///{Path(stack.env['STEPRUN_DATA_DIR']) / 'steprun.db'}")


def test_memory_follows_the_user_across_sessions_and_no_further(stack: Stack) -> None:
    alice, bob = stack.new_user_key(), stack.new_user_key()
    saved = _ask(stack, alice, "remember my favourite colour is teal")
    assert saved["output"] == "The result of remember is Remembered: my favourite colour is teal."
    recalled = _ask(stack, alice, "recall favourite colour")  # a new session
    assert "teal" in recalled["output"]
    assert _ask(stack, bob, "recall favourite colour")["output"] == "The result of recall is No memories match that."

    listed = requests.get(f"{stack.url}/v1/memory?q=colour", headers=_h(alice)).json()
    assert [m["value"]["text"] for m in listed["data"]] == ["my favourite colour is teal"]
    assert requests.get(f"{stack.url}/v1/memory?q=colour", headers=_h(bob)).json() == {"data": [], "next": None}

    # The same store through the API: create, replace, read, list, delete.
    url = f"{stack.url}/v1/memory/prefs/units"
    assert requests.put(url, json={"value": "metric", "ttl_seconds": 3600}, headers=_h(alice)).status_code == 201
    replaced = requests.put(url, json={"value": {"units": "imperial"}}, headers=_h(alice))
    assert replaced.status_code == 200 and replaced.json()["expires_at"] is None
    assert requests.get(url, headers=_h(alice)).json()["value"] == {"units": "imperial"}
    assert requests.get(url, headers=_h(bob)).status_code == 404
    assert len(requests.get(f"{stack.url}/v1/memory?limit=1", headers=_h(alice)).json()["data"]) == 1
    assert requests.delete(url, headers=_h(alice)).status_code == 200
    assert requests.get(url, headers=_h(alice)).status_code == 404
    bad = requests.put(f"{stack.url}/v1/memory/prefs/units", json={"ttl_seconds": 5}, headers=_h(alice))
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "value"


def test_uploaded_document_is_found_and_cited(stack: Stack) -> None:
    alice, bob = stack.new_user_key(), stack.new_user_key()
    r = requests.post(f"{stack.url}/v1/knowledge", json={"title": "Returns policy", "text": REFUNDS,
                                                         "format": "markdown"}, headers=_h(alice))
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["chunks"] >= 2 and doc["scope"] == "user"

    answer = _ask(stack, alice, "search_knowledge how long until refunds are issued")["output"]
    assert answer.startswith('The result of search_knowledge is [1] "Returns policy" (' + doc["id"] + ")")
    assert "14 days" in answer

    hits = requests.get(f"{stack.url}/v1/knowledge/search?q=refund+window", headers=_h(alice)).json()["data"]
    assert hits[0]["document_id"] == doc["id"] and "14 days" in hits[0]["text"]
    assert requests.get(f"{stack.url}/v1/knowledge/search?q=refunds", headers=_h(bob)).json()["data"] == []
    assert requests.get(f"{stack.url}/v1/knowledge/{doc['id']}", headers=_h(bob)).status_code == 404
    assert "No documents match" in _ask(stack, bob, "search_knowledge refunds")["output"]

    r = requests.post(f"{stack.url}/v1/knowledge", json={"title": "x", "text": "y", "scope": "tenant"},
                      headers=_h(alice))
    assert r.status_code == 403 and r.json()["error"]["field"] == "scope"
    assert requests.get(f"{stack.url}/v1/knowledge/{doc['id']}", headers=_h(alice)).json()["text"] == REFUNDS
    assert requests.delete(f"{stack.url}/v1/knowledge/{doc['id']}", headers=_h(alice)).status_code == 200
    assert requests.get(f"{stack.url}/v1/knowledge/search?q=refunds", headers=_h(alice)).json()["data"] == []


def test_trace_shows_steps_model_and_tool_calls(stack: Stack) -> None:
    key = stack.new_user_key()
    turn = _ask(stack, key, "please add 20 and 22", agent="math")
    r = requests.get(f"{stack.url}/v1/turns/{turn['id']}/trace", headers=_h(key))
    assert r.status_code == 200, r.text
    trace = r.json()
    spans = trace["spans"]
    assert [(s["step"], s["kind"]) for s in spans] == [(0, "step"), (0, "model"), (0, "tool"),
                                                       (1, "step"), (1, "model")]
    steps = {s["span_id"]: s for s in spans if s["kind"] == "step"}
    for span in spans:
        assert span["duration_ms"] >= 0 and span["started_at"] <= span["ended_at"]
        if span["kind"] != "step":
            parent = steps[span["parent_span_id"]]
            assert parent["step"] == span["step"]
            assert parent["started_at"] <= span["started_at"] and span["ended_at"] <= parent["ended_at"]
            assert parent["duration_ms"] >= span["duration_ms"]
    first_model, tool_call, second_model = spans[1], spans[2], spans[4]
    assert first_model["attributes"]["finish_reason"] == "tool_calls"
    assert first_model["attributes"]["input_tokens"] > 0
    assert tool_call["name"] == "add" and tool_call["status"] == "ok"
    assert tool_call["attributes"]["arguments"] == {"a": 20, "b": 22} and tool_call["attributes"]["result_chars"] == 2
    assert second_model["attributes"]["output_tokens"] == turn["usage"]["output_tokens"]
    assert 0 <= second_model["attributes"]["time_to_first_token_ms"] <= second_model["duration_ms"]
    assert spans[0]["attributes"]["queue_latency_ms"] >= 0
    assert requests.get(f"{stack.url}/v1/turns/{turn['id']}/trace", headers=_h(stack.new_user_key())).status_code == 404


def _sample(metrics_text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent), labels matched as a subset."""
    total = 0.0
    for line in metrics_text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_metrics_move_when_turns_run(stack: Stack) -> None:
    worker_url = stack.worker_metrics_url or f"{stack.url}/metrics"
    before_api = requests.get(f"{stack.url}/metrics").text
    before_worker = requests.get(worker_url).text
    key = stack.new_user_key()
    _ask(stack, key, "add 1 and 2", agent="math")
    api = requests.get(f"{stack.url}/metrics").text
    worker = requests.get(worker_url).text
    route = "/v1/sessions/<session_id>/turns"
    assert (_sample(api, "steprun_http_requests_total", route=route, status="202")
            == _sample(before_api, "steprun_http_requests_total", route=route, status="202") + 1)
    assert _sample(api, "steprun_http_request_duration_seconds_count", route=route) >= 1
    assert (_sample(worker, "steprun_turns_finished_total", status="completed")
            >= _sample(before_worker, "steprun_turns_finished_total", status="completed") + 1)
    for name in ("steprun_step_duration_seconds_count", "steprun_model_call_duration_seconds_count",
                 "steprun_queue_latency_seconds_count", "steprun_tool_call_duration_seconds_count"):
        assert _sample(worker, name) >= _sample(before_worker, name) + 1, name
    assert (_sample(worker, "steprun_model_time_to_first_token_seconds_count")
            > _sample(before_worker, "steprun_model_time_to_first_token_seconds_count"))
    assert "steprun_active_streams" in api


def test_deleting_a_session_deletes_its_rows_and_events(stack: Stack, rt: Runtime) -> None:
    key = stack.new_user_key()
    turn = _ask(stack, key, "add 5 and 6", agent="math")
    sid = turn["session_id"]
    export = requests.get(f"{stack.url}/v1/sessions/{sid}/export", headers=_h(key)).json()
    assert export["session"]["id"] == sid and [t["id"] for t in export["turns"]] == [turn["id"]]
    assert [m["role"] for m in export["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert export["checkpoint"]["state"]["messages"][-1]["content"] == "The result of add is 11."
    assert len(export["traces"][0]["spans"]) == 5
    assert requests.get(f"{stack.url}/v1/sessions/{sid}/export", headers=_h(stack.new_user_key())).status_code == 404

    assert requests.delete(f"{stack.url}/v1/sessions/{sid}", headers=_h(key)).status_code == 200
    with _db(stack, rt).connect() as conn:
        for table in ("turns", "messages", "checkpoints", "trace_spans"):
            left = conn.execute(text(f"SELECT count(*) FROM {table} WHERE session_id = :s"), {"s": sid}).scalar()
            assert left == 0, table
    if stack.mode == "production":
        assert rt.redis.exists(f"{stack.env['STEPRUN_REDIS_PREFIX']}:s:{sid}:log") == 0
    assert requests.get(f"{stack.url}/v1/sessions/{sid}/events", headers=_h(key)).status_code == 404


def _row_counts(stack: Stack, rt: Runtime, user: str) -> dict[str, int]:
    with _db(stack, rt).connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t} WHERE user_id = :u"), {"u": user}).scalar()
                for t in ("sessions", "turns", "messages", "checkpoints", "trace_spans", "memory_items",
                          "knowledge_documents", "knowledge_chunks")}


def test_erasing_my_data_removes_all_of_it_and_nothing_else(stack: Stack, rt: Runtime) -> None:
    tenant = f"t-{secrets.token_hex(4)}"
    cwd = Path(stack.env.get("_STEPRUN_CWD", str(ROOT)))
    users = {name: f"u-{name}-{secrets.token_hex(3)}" for name in ("gone", "kept")}
    keys = {name: create_key_cli(stack.env, tenant, user, cwd=cwd) for name, user in users.items()}
    sessions = {}
    for name, key in keys.items():
        sessions[name] = _ask(stack, key, f"remember {name} likes tea")["session_id"]
        _ask(stack, key, "add 1 and 1", agent="math")
        requests.post(f"{stack.url}/v1/knowledge", json={"title": name, "text": f"{name} notes"}, headers=_h(key))
    before = _row_counts(stack, rt, users["kept"])
    assert all(before.values()), before

    r = requests.delete(f"{stack.url}/v1/users/me/data", headers=_h(keys["gone"]))
    assert r.status_code == 200, r.text
    assert r.json()["deleted"]["sessions"] == 2 and r.json()["deleted"]["memory_items"] == 1
    assert set(_row_counts(stack, rt, users["gone"]).values()) == {0}
    assert _row_counts(stack, rt, users["kept"]) == before
    h = _h(keys["gone"])
    assert requests.get(f"{stack.url}/v1/sessions", headers=h).json()["data"] == []
    assert requests.get(f"{stack.url}/v1/memory", headers=h).json()["data"] == []
    assert requests.get(f"{stack.url}/v1/knowledge", headers=h).json()["data"] == []
    if stack.mode == "production":
        prefix = stack.env["STEPRUN_REDIS_PREFIX"]
        assert rt.redis.exists(f"{prefix}:s:{sessions['gone']}:log") == 0
        assert rt.redis.exists(f"{prefix}:s:{sessions['kept']}:log") == 1
    assert "kept likes tea" in _ask(stack, keys["kept"], "recall tea")["output"]

    if stack.mode == "production":  # the operator's command does the same for the other user
        out = subprocess.run([str(BIN / "steprun"), "users", "erase", "--tenant", tenant, "--user", users["kept"]],
                             env=stack.env, cwd=cwd, capture_output=True, text=True, timeout=60, check=True)
        assert "sessions=3" in out.stdout and "memory_items=1" in out.stdout
        assert set(_row_counts(stack, rt, users["kept"]).values()) == {0}
        assert rt.redis.exists(f"{prefix}:s:{sessions['kept']}:log") == 0
