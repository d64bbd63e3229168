"""Red-team regressions against the real Procfile processes (gunicorn web, Celery worker, scheduler).

One test per class of attack in the hardening issue: a request that froze a
worker, inputs that got a 500, credentials that kept authority, one user
starving the others. Each asserts what the attacker and the other users see.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import requests
import websocket

from shared.auth.keys import create_key, revoke_key
from shared.auth.principal import SYSTEM
from shared.db import unit_of_work
from shared.engine.step import build_runtime
from shared.runtime import Runtime
from shared.settings import Settings
from tests.support.processes import Procs, settings_env
from tests.support.recovery_support import drop_database, fresh_database, own_settings

JWT_SECRET = "j" * 48
JWT_TENANT = "t-jwt-acme"


@dataclass
class Deployment:
    url: str
    env: dict[str, str]
    procs: Procs
    rt: Runtime

    def key(self, tenant: str | None = None, user: str | None = "fresh") -> tuple[str, str]:
        """(key id, raw key) of a fresh user (or, with user=None, a service key) of a fresh tenant."""
        tenant = tenant or f"t-{secrets.token_hex(4)}"
        with unit_of_work(self.rt.sessions, SYSTEM) as db:  # keys: the system path
            row, raw = create_key(db, tenant, None if user is None else f"u-{secrets.token_hex(4)}")
            return row.id, raw

    def revoke(self, key_id: str) -> None:
        with unit_of_work(self.rt.sessions, SYSTEM) as db:  # keys: the system path
            assert revoke_key(db, key_id)


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = settings_env(settings)
    env.update(STEPRUN_JWT_SECRET=JWT_SECRET, STEPRUN_JWT_TENANT=JWT_TENANT,
               STEPRUN_KEY_CACHE_SECONDS="1")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def deployment(settings: Settings, rt: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    procs = Procs(settings, tmp_path_factory.mktemp("security"))
    env = _env(settings)
    try:
        procs.worker(env=env)
        procs.scheduler(env=env)
        _, url = procs.web(env=env)
        yield Deployment(url, env, procs, rt)
    finally:
        procs.stop_all()


def _h(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def _session(d: Deployment, key: str, agent: str = "echo") -> str:
    r = requests.post(f"{d.url}/v1/sessions", json={"agent": agent}, headers=_h(key), timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _ws(d: Deployment, sid: str, key: str | None = None, **query: Any) -> websocket.WebSocket:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    url = "ws" + d.url[len("http"):] + f"/v1/sessions/{sid}/ws" + (f"?{q}" if q else "")
    return websocket.create_connection(url, header=[f"Authorization: Bearer {key}"] if key else [], timeout=15)


def _recv_until(ws: websocket.WebSocket, kind: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        ws.settimeout(max(0.1, deadline - time.monotonic()))
        frame = json.loads(ws.recv())
        if frame.get("type") == kind:
            return frame


# --- 1. one request froze a web worker ------------------------------------------------------------


def test_a_pathological_markdown_upload_does_not_freeze_the_worker(deployment: Deployment) -> None:
    _, key = deployment.key()
    results: dict[str, Any] = {}

    def upload() -> None:
        # 4 KB that held the gevent loop past gunicorn's 60 s timeout with the backtracking heading regex.
        body = {"title": "t", "format": "markdown", "text": "# a" + " " * 4000 + "b"}
        results["upload"] = requests.post(f"{deployment.url}/v1/knowledge", json=body, headers=_h(key), timeout=30)

    worker = threading.Thread(target=upload)
    worker.start()
    # Meanwhile, every other client of the same worker is served.
    health = requests.get(f"{deployment.url}/healthz", timeout=5)
    worker.join(35)
    assert health.status_code == 200
    assert results["upload"].status_code == 201, results["upload"].text
    # The largest document a body may carry is chunked well inside the worker timeout, too.
    big = "\n".join(("#" * (i % 6 + 1)) + " h" + " " * 50 + "x" for i in range(8000))
    r = requests.post(f"{deployment.url}/v1/knowledge", json={"title": "big", "format": "markdown", "text": big},
                      headers=_h(key), timeout=30)
    assert r.status_code == 201, r.text


# --- 4. one input gate: every bad input is a 400 naming the field, nothing written ------------------


NUL_ROUTES = [
    ("GET", "/v1/sessions/ses_a%00b"), ("DELETE", "/v1/sessions/ses_a%00b"),
    ("GET", "/v1/sessions/ses_a%00b/messages"), ("POST", "/v1/sessions/ses_a%00b/turns"),
    ("GET", "/v1/sessions/ses_a%00b/events"), ("GET", "/v1/sessions/ses_a%00b/events/stream"),
    ("POST", "/v1/sessions/ses_a%00b/stream-token"), ("GET", "/v1/sessions/ses_a%00b/export"),
    ("GET", "/v1/turns/turn_a%00b"), ("POST", "/v1/turns/turn_a%00b/cancel"),
    ("POST", "/v1/turns/turn_a%00b/resume"), ("GET", "/v1/turns/turn_a%00b/trace"),
    ("GET", "/v1/memory/notes/a%00b"), ("PUT", "/v1/memory/notes/a%00b"),
    ("GET", "/v1/sessions/ses_a%0Ab"), ("GET", "/v1/turns/turn_a%0D%0AFORGED%20log%20line"),
]


@pytest.mark.parametrize("method,path", NUL_ROUTES)
def test_control_characters_in_path_ids_are_a_400_naming_the_id(deployment: Deployment, method: str,
                                                                 path: str) -> None:
    _, key = deployment.key()
    r = requests.request(method, deployment.url + path, json={}, headers=_h(key), timeout=10)
    assert r.status_code == 400, (path, r.status_code, r.text)
    assert r.json()["error"]["field"] in ("session_id", "turn_id", "key")


def test_nul_in_the_websocket_handshake_is_a_400(deployment: Deployment) -> None:
    _, key = deployment.key()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        _ws(deployment, "ses_a%00b", key)
    assert refused.value.status_code == 400


@pytest.mark.parametrize("body,field", [
    ('{"agent": "echo", "metadata": {"x": NaN}}', "metadata.x"),
    ('{"agent": "echo", "metadata": {"x": Infinity}}', "metadata.x"),
    ('{"agent": "echo", "metadata": {"x": [1, -Infinity]}}', "metadata.x[1]"),
    ('{"agent": "echo", "metadata": {"x": 1e999}}', "metadata.x"),
    ('{"agent": "echo", "metadata": {"x": "a\\u0000b"}}', "metadata.x"),
    ('{"agent": "echo", "metadata": {"x": "\\ud800"}}', "metadata.x"),
    ('{"agent": "echo", "metadata": ' + "[" * 10_000 + "]" * 10_000 + "}", None),
    ('{"agent": "echo", "metadata": {"x": ' + "[" * 500 + "]" * 500 + "}}", None),
])
def test_unstorable_json_is_a_400_naming_the_field_and_writes_nothing(deployment: Deployment, body: str,
                                                                      field: str | None) -> None:
    _, key = deployment.key()
    r = requests.post(f"{deployment.url}/v1/sessions", data=body, headers=_h(key, **{
        "Content-Type": "application/json"}), timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"].get("field") == field
    listed = requests.get(f"{deployment.url}/v1/sessions", headers=_h(key), timeout=10).json()["data"]
    assert listed == []


@pytest.mark.parametrize("path,field", [
    ("/v1/sessions?limit=1_0", "limit"), ("/v1/sessions?limit=%D9%A3", "limit"),
    ("/v1/memory?namespace=notes%0A", "namespace"), ("/v1/turns/x?wait=1_0", None),
])
def test_numbers_and_names_are_plain_ascii(deployment: Deployment, path: str, field: str | None) -> None:
    _, key = deployment.key()
    r = requests.get(deployment.url + path, headers=_h(key), timeout=10)
    assert r.status_code == 400, r.text
    if field:
        assert r.json()["error"]["field"] == field


def test_a_non_ascii_last_event_id_is_a_400(deployment: Deployment) -> None:
    _, key = deployment.key()
    sid = _session(deployment, key)
    r = requests.get(f"{deployment.url}/v1/sessions/{sid}/events/stream",
                     headers=_h(key, **{"Last-Event-ID": "²".encode().decode("latin-1")}), timeout=10)
    assert r.status_code == 400 and r.json()["error"]["field"] == "Last-Event-ID", r.text


def test_a_signed_jwt_whose_sub_holds_nul_is_a_400(deployment: Deployment) -> None:
    token = jwt.encode({"tid": JWT_TENANT, "sub": "a\x00b", "exp": int(time.time()) + 60}, JWT_SECRET)
    r = requests.get(f"{deployment.url}/v1/sessions", headers=_h(token), timeout=10)
    assert r.status_code == 400 and r.json()["error"]["field"] == "sub", r.text


def test_bad_websocket_frames_get_an_error_frame_and_the_socket_stays(deployment: Deployment) -> None:
    _, key = deployment.key()
    sid = _session(deployment, key)
    ws = _ws(deployment, sid, key)
    try:
        for frame, field in [
            ('{"type": "turn", "input": "a\\u0000b", "ref": 1}', "input"),
            ('{"type": "turn", "input": "\\udfff", "ref": 2}', "input"),
            ('{"type": "turn", "input": ' + "[" * 5000 + "]" * 5000 + ', "ref": 3}', None),
            ('{"type": "turn", "input": NaN, "ref": 4}', "input"),
        ]:
            ws.send(frame)
            error = _recv_until(ws, "error")
            assert error["error"]["code"] == "invalid_request", error
            assert error["error"].get("field") == field, (frame[:60], error)
        ws.send('{"type": "ping", "ref": "alive"}')
        assert _recv_until(ws, "pong")["ref"] == "alive"
    finally:
        ws.close()
    turns = requests.get(f"{deployment.url}/v1/sessions/{sid}/messages", headers=_h(key), timeout=10).json()
    assert turns["data"] == []


# --- 2. one user, or nobody, could starve everyone ---------------------------------------------------


@pytest.fixture(scope="module")
def fair(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A deployment of its own (database, queue, Redis prefix: no other scheduler re-sends its turns):
    one worker with 6 slots, a user may run 2 turns, small per-key and storage limits."""
    url = fresh_database()
    own = own_settings(settings, url)
    procs = Procs(own, tmp_path_factory.mktemp("fair"))
    env = _env(own, STEPRUN_AGENTS="tests.support.agents_slow_and_storage", STEPRUN_MAX_RUNNING_TURNS_PER_USER="2",
               STEPRUN_RATE_LIMIT_PER_KEY="25", STEPRUN_QUOTA_USER_MEMORY_ITEMS="1",
               STEPRUN_QUOTA_USER_DOCUMENTS="2", STEPRUN_QUOTA_USER_HISTORY_BYTES="4000")
    own_rt = build_runtime(own)
    try:
        procs.worker(concurrency=6, env=env)
        procs.scheduler(env=env)
        _, web_url = procs.web(env=env)
        yield Deployment(web_url, env, procs, own_rt)
    finally:
        procs.stop_all()
        own_rt.close()
        drop_database(url)


def _turns(d: Deployment, ids: list[str]) -> dict[str, Any]:
    from shared.auth.principal import SYSTEM
    from shared.models import Turn

    with unit_of_work(d.rt.sessions, SYSTEM) as db:
        return {t.id: (t.status, t.attempt, t.started_at, t.finished_at)
                for t in db.query(Turn).filter(Turn.id.in_(ids)).all()}


def _post_turn(d: Deployment, key: str, agent: str, text: str, **headers: str) -> requests.Response:
    r = requests.post(f"{d.url}/v1/sessions", json={"agent": agent}, headers=_h(key, **headers), timeout=10)
    assert r.status_code == 201, r.text
    return requests.post(f"{d.url}/v1/sessions/{r.json()['id']}/turns", json={"input": text},
                         headers=_h(key, **headers), timeout=10)


def test_one_users_long_turns_do_not_hold_every_worker_slot(fair: Deployment) -> None:
    _, hog = fair.key()
    _, other = fair.key()
    hog_turns = [_post_turn(fair, hog, "slow", f"long {i}").json()["id"] for i in range(6)]
    quick = _post_turn(fair, other, "math", "add 2 and 40").json()["id"]  # sent after all six
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        rows = _turns(fair, [*hog_turns, quick])
        if all(status == "completed" for status, *_ in rows.values()):
            break
        time.sleep(0.3)
    assert all(status == "completed" for status, *_ in rows.values()), rows
    hog_rows = [rows[t] for t in hog_turns]
    # The other user's turn started before any of the hog's ended: it did not wait for a slot.
    assert rows[quick][2] < min(finished for *_, finished in hog_rows)
    # The hog never ran more than its 2 at once; the rest waited without spending an attempt.
    for _, _, started, _ in hog_rows:
        assert sum(1 for *_, s, f in hog_rows if s <= started < f) <= 2
    assert [attempt for _, attempt, _, _ in hog_rows] == [1] * 6


def test_rotating_x_user_id_does_not_escape_the_keys_budget(fair: Deployment) -> None:
    _, service = fair.key(user=None)
    codes = []
    for i in range(30):
        r = requests.get(f"{fair.url}/v1/sessions", headers=_h(service, **{"X-User-Id": f"rotated-{i}"}), timeout=10)
        codes.append(r.status_code)
        if r.status_code == 429:
            refused = r
    assert codes.count(200) == 25 and codes[25:] == [429] * 5, codes
    error = refused.json()["error"]
    assert error["code"] == "rate_limited" and "STEPRUN_RATE_LIMIT_PER_KEY" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


def test_failed_authentications_from_one_address_are_cut_off_before_any_key_lookup(
        settings: Settings, rt: Runtime, tmp_path_factory: pytest.TempPathFactory) -> None:
    own = settings.replace(redis_prefix=f"{settings.redis_prefix}-authfail-{secrets.token_hex(3)}")
    procs = Procs(own, tmp_path_factory.mktemp("authfail"))
    try:
        _, url = procs.web(env=_env(own, STEPRUN_AUTH_FAILURES_PER_IP="5"))
        d = Deployment(url, {}, procs, rt)
        _, good = d.key()
        if time.time() % 60 > 50:  # one counting window
            time.sleep(60 - time.time() % 60 + 0.2)
        codes = [requests.get(f"{url}/v1/sessions", headers=_h(f"sr_guess{i}"), timeout=10).status_code
                 for i in range(7)]
        assert codes == [401] * 5 + [429] * 2
        blocked = requests.get(f"{url}/v1/sessions", headers=_h(good), timeout=10)
        assert blocked.status_code == 429 and 1 <= int(blocked.headers["Retry-After"]) <= 60
        assert "STEPRUN_AUTH_FAILURES_PER_IP" in blocked.json()["error"]["message"]
        # A forged X-Forwarded-For changes nothing without a trusted proxy.
        assert requests.get(f"{url}/v1/sessions", headers=_h(good, **{"X-Forwarded-For": "203.0.113.9"}),
                            timeout=10).status_code == 429
    finally:
        procs.stop_all()


def test_storage_quotas_refuse_uploads_inputs_and_tool_writes_past_them(fair: Deployment) -> None:
    _, key = fair.key()
    docs = [requests.post(f"{fair.url}/v1/knowledge", json={"title": f"d{i}", "text": "x" * 10_000},
                          headers=_h(key), timeout=10) for i in range(3)]
    assert [r.status_code for r in docs] == [201, 201, 413]
    error = docs[2].json()["error"]
    assert error["code"] == "quota_exceeded" and "STEPRUN_QUOTA_USER_DOCUMENTS=2" in error["message"]
    assert len(requests.get(f"{fair.url}/v1/knowledge", headers=_h(key), timeout=10).json()["data"]) == 2

    # A tool writing memory past the quota: its result is the error, and the turn completes.
    # One after the other, so which one is past the quota is known (writers at once: tests/unit/test_quotas.py).
    done = {}
    for text in ("remember my favourite colour is teal", "remember my dog is called Rex"):
        turn_id = _post_turn(fair, key, "assistant", text).json()["id"]
        done[turn_id] = requests.get(f"{fair.url}/v1/turns/{turn_id}?wait=30", headers=_h(key), timeout=40).json()
    first, second = list(done)
    assert done[first]["status"] == "completed" and "Remembered" in done[first]["output"], done[first]
    assert done[second]["status"] == "completed", done[second]
    assert "QuotaExceeded" in done[second]["output"] and "STEPRUN_QUOTA_USER_MEMORY_ITEMS=1" in done[second]["output"]
    items = requests.get(f"{fair.url}/v1/memory", headers=_h(key), timeout=10).json()["data"]
    assert [i["value"]["text"] for i in items] == ["my favourite colour is teal"]

    # Turn input: the user's sessions keep at most 4000 bytes of it (the two turns above hold some).
    big = _post_turn(fair, key, "echo", "y" * 3990)
    assert big.status_code == 413 and big.json()["error"]["code"] == "quota_exceeded", big.text
    assert "STEPRUN_QUOTA_USER_HISTORY_BYTES=4000" in big.json()["error"]["message"]
