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
from shared.runtime import Runtime
from shared.settings import Settings
from tests.support.processes import Procs, settings_env

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
