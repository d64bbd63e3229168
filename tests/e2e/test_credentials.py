"""Credentials keep no authority they should not have, and erasure is final (hardening issue, items 3 and 6).

Against the real Procfile processes (gunicorn web, Celery worker, scheduler):
a JWT key speaks for its own tenant only and for a capped lifetime; a stream
token is read-only unless minted for writing, and dies with the key that
minted it; an open WebSocket or SSE stream is closed (4401 / an error event)
once its token expires or its key is revoked; a production process refuses
placeholder and short secrets; and a tool still running when its user erases
their data writes nothing back.
"""
from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import websocket
from sqlalchemy import func, select

from shared.auth.keys import create_key, revoke_key
from shared.auth.principal import SYSTEM, Principal
from shared.auth.stream_tokens import mint_stream_token
from shared.db import unit_of_work
from shared.models import AgentSession, Checkpoint, MemoryItem, Message, ToolCall, Turn
from shared.runtime import Runtime
from shared.settings import Settings
from tests.support.processes import BIN, ROOT, Procs, free_port, settings_env

JWT_SECRET = "j" * 48
JWT_TENANT = "t-cred-acme"
GLOBEX_ISSUER = "https://login.globex.example/"
GLOBEX_SECRET = "g" * 48
GLOBEX_TENANT = "t-cred-globex"
KEY_CACHE_SECONDS = 1.0  # sockets recheck every 0.5 s, key answers are trusted 0.5 s: closed within 1 s
HEARTBEAT_SECONDS = 1.0  # SSE keep-alives: a quiet compatible stream is rechecked between them


@dataclass
class Deployment:
    url: str
    env: dict[str, str]
    rt: Runtime

    def key(self, tenant: str | None = None) -> tuple[str, str, Principal]:
        """(key id, raw key, principal) of a fresh user of ``tenant`` (default: a fresh tenant)."""
        who = Principal(tenant or f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}")
        with unit_of_work(self.rt.sessions, SYSTEM) as db:
            row, raw = create_key(db, who.tenant_id, who.user_id)
            return row.id, raw, who

    def revoke(self, key_id: str) -> None:
        with unit_of_work(self.rt.sessions, SYSTEM) as db:
            assert revoke_key(db, key_id)

    @property
    def secret(self) -> str:
        return self.env["STEPRUN_SECRET_KEY"]


@pytest.fixture(scope="module")
def deployment(settings: Settings, rt: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    procs = Procs(settings, tmp_path_factory.mktemp("credentials"))
    env = settings_env(settings)
    env.update(STEPRUN_AGENTS="tests.support.agents_security", STEPRUN_JWT_SECRET=JWT_SECRET,
               STEPRUN_JWT_TENANT=JWT_TENANT, STEPRUN_KEY_CACHE_SECONDS=str(KEY_CACHE_SECONDS),
               STEPRUN_SSE_HEARTBEAT_SECONDS=str(HEARTBEAT_SECONDS),
               STEPRUN_JWT_ISSUERS=json.dumps({GLOBEX_ISSUER: {"tenant": GLOBEX_TENANT, "secret": GLOBEX_SECRET}}))
    try:
        procs.worker(env=env)
        procs.scheduler(env=env)
        _, url = procs.web(env=env)
        yield Deployment(url, env, rt)
    finally:
        procs.stop_all()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _session(d: Deployment, key: str, agent: str = "echo") -> str:
    r = requests.post(f"{d.url}/v1/sessions", json={"agent": agent}, headers=_h(key), timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _ws(d: Deployment, sid: str, key: str | None = None, token: str | None = None) -> websocket.WebSocket:
    url = "ws" + d.url[len("http"):] + f"/v1/sessions/{sid}/ws" + (f"?token={token}" if token else "")
    return websocket.create_connection(url, header=[f"Authorization: Bearer {key}"] if key else [], timeout=15)


def _replies(ws: websocket.WebSocket, timeout: float = 15) -> Iterator[tuple[str, Any]]:
    """("text", frame) and ("close", (code, reason)) in order, until the close or the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws.settimeout(max(0.1, deadline - time.monotonic()))
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            yield "close", (int.from_bytes(data[:2], "big"), json.loads(data[2:]))
            return
        if opcode == websocket.ABNF.OPCODE_TEXT:
            yield "text", json.loads(data)
    raise AssertionError("no close before the timeout")


def _reply(ws: websocket.WebSocket, ref: str) -> dict[str, Any]:
    for kind, value in _replies(ws):
        if kind == "text" and value.get("ref") == ref:
            return value
    raise AssertionError(f"no reply to {ref}")


def _close_of(ws: websocket.WebSocket, timeout: float) -> tuple[tuple[int, dict[str, Any]], list[dict[str, Any]]]:
    frames: list[dict[str, Any]] = []
    for kind, value in _replies(ws, timeout):
        if kind == "close":
            return value, frames
        frames.append(value)
    raise AssertionError("unreachable")


def _sse_error(d: Deployment, sid: str, timeout: float, **kw: Any) -> tuple[dict[str, Any], float]:
    """Open the SSE stream and read until its `error` event: (the error, seconds it took)."""
    started = time.monotonic()
    with requests.get(f"{d.url}/v1/sessions/{sid}/events/stream", stream=True, timeout=timeout, **kw) as r:
        assert r.status_code == 200, r.text
        event = None
        for line in r.iter_lines(chunk_size=None, decode_unicode=True):
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event == "error":
                return json.loads(line[len("data: "):])["error"], time.monotonic() - started
    raise AssertionError("the SSE stream ended without an error event")


def _jwt(claims: dict[str, Any], key: str = JWT_SECRET) -> str:
    now = int(time.time())
    return jwt.encode({"sub": f"u-{secrets.token_hex(3)}", "iat": now, "exp": now + 60, **claims}, key)


def _sessions_status(d: Deployment, token: str) -> requests.Response:
    return requests.get(f"{d.url}/v1/sessions", headers=_h(token), timeout=10)


# --- JWTs: a key speaks for its own tenant, for a capped lifetime ----------------------------------------


def test_a_jwt_key_speaks_for_its_own_tenant_only(deployment: Deployment) -> None:
    assert _sessions_status(deployment, _jwt({"tid": JWT_TENANT})).status_code == 200
    # The attack: the same secret, another tenant's id in `tid`.
    r = _sessions_status(deployment, _jwt({"tid": "globex"}))
    assert r.status_code == 401 and "tenant its signing key speaks for" in r.json()["error"]["message"], r.text
    # An issuer bound to its tenant: its tokens speak for that tenant, with its key only.
    assert _sessions_status(deployment, _jwt({"tid": GLOBEX_TENANT, "iss": GLOBEX_ISSUER},
                                             GLOBEX_SECRET)).status_code == 200
    assert _sessions_status(deployment, _jwt({"tid": JWT_TENANT, "iss": GLOBEX_ISSUER},
                                             GLOBEX_SECRET)).status_code == 401
    assert _sessions_status(deployment, _jwt({"tid": GLOBEX_TENANT, "iss": GLOBEX_ISSUER})).status_code == 401
    assert _sessions_status(deployment, _jwt({"tid": GLOBEX_TENANT}, GLOBEX_SECRET)).status_code == 401


@pytest.mark.parametrize("claims,why", [
    ({"exp": int(time.time()) + 30 * 86400, "iat": None}, "more than 3600 s away"),
    ({"iat": int(time.time()) - 7000, "exp": int(time.time()) + 300}, "more than 3600 s"),
    ({"exp": str(int(time.time()) + 60)}, "must be a number"),
    ({"exp": 1e300}, "more than 3600 s away"),
    ({"exp": True}, "must be a number"),
    ({"iat": int(time.time()) + 3000}, "in the future"),
])
def test_jwt_lifetimes_are_capped_and_exp_is_a_number(deployment: Deployment, claims: dict[str, Any],
                                                      why: str) -> None:
    now = int(time.time())
    body = {"tid": JWT_TENANT, "sub": "u-capped", "iat": now, "exp": now + 60, **claims}
    token = jwt.encode({k: v for k, v in body.items() if v is not None}, JWT_SECRET)
    r = _sessions_status(deployment, token)
    assert r.status_code == 401 and why in r.json()["error"]["message"], r.text


# --- stream tokens: read-only unless minted for writing ---------------------------------------------------


def _pending_transfer(d: Deployment, key: str) -> tuple[str, str]:
    sid = _session(d, key, "bank")
    r = requests.post(f"{d.url}/v1/sessions/{sid}/turns", json={"input": "transfer 25 to mallory"},
                      headers=_h(key), timeout=10)
    assert r.status_code == 202, r.text
    turn = requests.get(f"{d.url}/v1/turns/{r.json()['id']}?wait=20", headers=_h(key), timeout=30).json()
    assert turn["status"] == "requires_action", turn
    return sid, turn["id"]


def _mint(d: Deployment, sid: str, key: str, scope: str | None = None) -> str:
    r = requests.post(f"{d.url}/v1/sessions/{sid}/stream-token", headers=_h(key),
                      json={"scope": scope} if scope else None, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == (scope or "read")
    return r.json()["token"]


def test_a_read_only_stream_token_cannot_approve_a_transfer(deployment: Deployment) -> None:
    _, key, _ = deployment.key()
    sid, turn_id = _pending_transfer(deployment, key)
    ws = _ws(deployment, sid, token=_mint(deployment, sid, key))
    try:
        for i, frame in enumerate([{"type": "resume", "turn_id": turn_id, "approve": True},
                                   {"type": "cancel", "turn_id": turn_id},
                                   {"type": "turn", "input": "transfer 99 to mallory"}]):
            ws.send(json.dumps({**frame, "ref": f"w{i}"}))
            error = _reply(ws, f"w{i}")
            assert error["type"] == "error" and error["error"]["code"] == "forbidden", error
            assert "read-only stream token" in error["error"]["message"]
        ws.send(json.dumps({"type": "ping", "ref": "p"}))
        assert _reply(ws, "p")["type"] == "pong"  # still open, still streaming
    finally:
        ws.close()
    turn = requests.get(f"{deployment.url}/v1/turns/{turn_id}", headers=_h(key), timeout=10).json()
    assert turn["status"] == "requires_action" and "sent" not in (turn["output"] or ""), turn
    turns = requests.get(f"{deployment.url}/v1/sessions/{sid}/messages", headers=_h(key), timeout=10).json()
    assert [m for m in turns["data"] if m["role"] == "user"] and len(
        [m for m in turns["data"] if m["role"] == "user"]) == 1  # no second turn was created

    # Asked for, a write token may approve.
    ws = _ws(deployment, sid, token=_mint(deployment, sid, key, "write"))
    try:
        ws.send(json.dumps({"type": "resume", "turn_id": turn_id, "approve": True, "ref": "ok"}))
        assert _reply(ws, "ok")["type"] == "resume.ok"
    finally:
        ws.close()
    done = requests.get(f"{deployment.url}/v1/turns/{turn_id}?wait=20", headers=_h(key), timeout=30).json()
    assert done["status"] == "completed" and "sent 25.00" in done["output"], done


def test_a_bad_scope_is_a_400(deployment: Deployment) -> None:
    _, key, _ = deployment.key()
    sid = _session(deployment, key)
    r = requests.post(f"{deployment.url}/v1/sessions/{sid}/stream-token", headers=_h(key),
                      json={"scope": "admin"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["field"] == "scope", r.text


def test_a_stream_token_dies_with_its_key(deployment: Deployment) -> None:
    key_id, key, _ = deployment.key()
    sid = _session(deployment, key)
    token = _mint(deployment, sid, key)
    url = f"{deployment.url}/v1/sessions/{sid}/events/stream?token={token}"
    with requests.get(url, stream=True, timeout=10) as r:
        assert r.status_code == 200
    deployment.revoke(key_id)
    time.sleep(KEY_CACHE_SECONDS + 0.5)
    r = requests.get(url, timeout=10)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"], r.text
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        _ws(deployment, sid, token=token)
    assert refused.value.status_code == 401


# --- open streams are rechecked: closed 4401 (WS) or ended with an error event (SSE) ----------------------


def test_a_websocket_closes_4401_when_its_key_is_revoked(deployment: Deployment) -> None:
    key_id, key, _ = deployment.key()
    sid = _session(deployment, key)
    by_key = _ws(deployment, sid, key)
    by_token = _ws(deployment, sid, token=_mint(deployment, sid, key, "write"))
    for ws in (by_key, by_token):
        ws.send(json.dumps({"type": "ping", "ref": "p"}))
        assert _reply(ws, "p")["type"] == "pong"
    revoked_at = time.monotonic()
    deployment.revoke(key_id)
    for ws in (by_key, by_token):
        (code, reason), frames = _close_of(ws, timeout=10)
        assert code == 4401 and reason == {"reason": "key_revoked", "cursor": reason["cursor"]}, (code, reason)
        assert frames[-1]["error"] == {"code": "unauthorized", "reason": "key_revoked",
                                       "message": "the key that opened this stream was revoked"}
    # Rechecked every half window, answers trusted half a window: closed within the window (1 s here),
    # plus scheduling on a loaded machine; the old code never closed them at all.
    took = time.monotonic() - revoked_at
    print(f"revoke -> both sockets closed 4401: {took:.2f} s (STEPRUN_KEY_CACHE_SECONDS={KEY_CACHE_SECONDS:g})")
    assert took < KEY_CACHE_SECONDS + 4


def test_an_sse_stream_ends_when_its_key_is_revoked(deployment: Deployment) -> None:
    key_id, key, _ = deployment.key()
    sid = _session(deployment, key)
    import threading

    threading.Timer(1.0, deployment.revoke, args=(key_id,)).start()
    error, took = _sse_error(deployment, sid, timeout=15, headers=_h(key))
    assert error["code"] == "unauthorized" and error["reason"] == "key_revoked" and "cursor" in error, error
    assert took < 1.0 + KEY_CACHE_SECONDS + 4


def test_streams_close_when_their_token_expires(deployment: Deployment) -> None:
    key_id, key, who = deployment.key()
    sid = _session(deployment, key)
    short, expires = mint_stream_token(deployment.secret, who, sid, ttl=2, key_id=key_id)
    ws = _ws(deployment, sid, token=short)
    (code, reason), frames = _close_of(ws, timeout=10)
    assert code == 4401 and reason["reason"] == "token_expired", (code, reason)
    assert frames[-1]["error"]["code"] == "unauthorized"
    assert time.time() - expires < 3  # at its expiry, not at the next 5 s poll of the log

    short, _ = mint_stream_token(deployment.secret, who, sid, ttl=2, key_id=key_id)
    error, took = _sse_error(deployment, sid, timeout=10, params={"token": short})
    assert error["reason"] == "token_expired" and took < 4, (error, took)

    # A JWT-authenticated socket, at the JWT's exp.
    jwt_sub = f"u-{secrets.token_hex(3)}"
    long_jwt = _jwt({"tid": JWT_TENANT, "sub": jwt_sub})
    jsid = _session(deployment, long_jwt)
    ws = _ws(deployment, jsid, _jwt({"tid": JWT_TENANT, "sub": jwt_sub, "exp": int(time.time()) + 3}))
    (code, reason), _ = _close_of(ws, timeout=10)
    assert code == 4401 and reason["reason"] == "token_expired", (code, reason)


def test_a_token_minted_with_a_jwt_lives_no_longer_than_the_jwt(deployment: Deployment) -> None:
    token = _jwt({"tid": JWT_TENANT, "exp": int(time.time()) + 20})
    sid = _session(deployment, token)
    r = requests.post(f"{deployment.url}/v1/sessions/{sid}/stream-token", headers=_h(token), timeout=10)
    assert r.status_code == 200 and r.json()["expires_in"] <= 20, r.text


# --- production refuses placeholder and short secrets -------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    ({"STEPRUN_SECRET_KEY": "change-me-to-a-long-random-string"}, "STEPRUN_SECRET_KEY is a placeholder"),
    ({"STEPRUN_SECRET_KEY": "short"}, "STEPRUN_SECRET_KEY is 5 bytes long; it must be at least 32"),
    ({"STEPRUN_JWT_SECRET": "x", "STEPRUN_JWT_TENANT": "acme"}, "STEPRUN_JWT_SECRET is 1 bytes long"),
    ({"STEPRUN_JWT_SECRET": "k" * 40}, "STEPRUN_JWT_TENANT is not"),
])
def test_production_refuses_placeholder_and_short_secrets(settings: Settings, extra: dict[str, str],
                                                          message: str) -> None:
    env = {**settings_env(settings), **extra}
    web = subprocess.run([str(BIN / "gunicorn"), "api.wsgi:app", "-c", "python:api.gunicorn_conf", "-b",
                          f"127.0.0.1:{free_port()}"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert web.returncode != 0 and message in web.stderr, web.stderr[-2000:]
    if "TENANT" not in message:
        assert "secrets.token_hex(32)" in web.stderr  # says how to make one
    worker = subprocess.run([str(BIN / "celery"), "-A", "workers.celery_app", "worker", "-P", "gevent"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert worker.returncode != 0 and message in worker.stdout + worker.stderr


# --- erasure is final ------------------------------------------------------------------------------------------


def _count(rt: Runtime, model: Any, who: Principal) -> int:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        return int(db.scalar(select(func.count()).select_from(model).where(
            model.tenant_id == who.tenant_id, model.user_id == who.user_id)) or 0)


def test_a_tool_still_running_writes_nothing_after_an_erase(deployment: Deployment, tmp_path: Path) -> None:
    _, key, who = deployment.key()
    sid = _session(deployment, key, "notes")
    go = tmp_path / "go"
    r = requests.post(f"{deployment.url}/v1/sessions/{sid}/turns", json={"input": f"late_note {go}"},
                      headers=_h(key), timeout=10)
    assert r.status_code == 202, r.text
    # Wait until the tool is running (its call is journaled as started), then erase.
    deadline = time.monotonic() + 20
    while _count(deployment.rt, ToolCall, who) == 0:
        assert time.monotonic() < deadline, "the tool never started"
        time.sleep(0.05)
    erased = requests.delete(f"{deployment.url}/v1/users/me/data", headers=_h(key), timeout=20)
    assert erased.status_code == 200 and erased.json()["deleted"]["sessions"] == 1, erased.text
    go.touch()  # the tool writes its note now, right after the erase (the old code kept it)
    time.sleep(3)  # past the write, the step's end and the worker's recheck of its lease
    for model in (MemoryItem, AgentSession, Turn, Message, Checkpoint, ToolCall):
        assert _count(deployment.rt, model, who) == 0, model.__name__
    assert requests.get(f"{deployment.url}/v1/memory", headers=_h(key), timeout=10).json()["data"] == []
    assert deployment.rt.events.head(sid) == 0  # no event of the erased session is back in the log
    # The user goes on: new data after the erase is kept.
    assert requests.put(f"{deployment.url}/v1/memory/notes/new", json={"value": 1}, headers=_h(key),
                        timeout=10).status_code in (200, 201)
    assert _count(deployment.rt, MemoryItem, who) == 1


def _sse_events(response: requests.Response, until: float) -> Iterator[tuple[str, str]]:
    """(event, data) of an SSE response as they arrive, until the stream ends or ``until``."""
    event, data = "message", ""
    for line in response.iter_lines(decode_unicode=True):
        assert time.monotonic() < until, "the stream did not end in time"
        if line == "":
            if data:
                yield event, data
            event, data = "message", ""
        elif line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data += line.split(":", 1)[1].strip()


def test_compatible_run_streams_end_when_their_key_is_revoked(deployment: Deployment, tmp_path: Path) -> None:
    """A LangGraph run stream and an OpenAI response stream are rechecked as the main streams are."""
    import threading

    for surface in ("langgraph", "openai"):
        key_id, key, _ = deployment.key()
        hold = tmp_path / f"never-{surface}"  # the tool waits for it (30 s): the run stays quiet and open
        if surface == "langgraph":
            thread = requests.post(f"{deployment.url}/langgraph/threads", json={}, headers=_h(key), timeout=10)
            assert thread.status_code == 200, thread.text
            url = f"{deployment.url}/langgraph/threads/{thread.json()['thread_id']}/runs/stream"
            body: dict[str, Any] = {"assistant_id": "notes", "stream_mode": ["values"],
                                    "input": {"messages": [{"role": "user", "content": f"late_note {hold}"}]}}
        else:
            url = f"{deployment.url}/v1/responses"
            body = {"model": "notes", "input": f"late_note {hold}", "stream": True}
        started = time.monotonic()
        threading.Timer(1.0, deployment.revoke, args=(key_id,)).start()
        with requests.post(url, json=body, headers=_h(key), stream=True, timeout=30) as r:
            assert r.status_code == 200, r.text
            events = list(_sse_events(r, until=started + 20))
        took = time.monotonic() - started
        print(f"\n{surface} run stream ended {took:.2f} s after it opened, its key revoked at 1 s")
        name, data = events[-1]
        assert name == "error", events[-3:]
        error = json.loads(data)
        assert "unauthorized" in (error.get("error"), error.get("code")), error
        # Revoked at 1 s; rechecked every half window, between writes (keep-alives every second here).
        assert took < 1.0 + KEY_CACHE_SECONDS + HEARTBEAT_SECONDS + 4, took
