"""Principals: user keys, service keys with X-User-Id, end-user JWTs (HS256/RS256); rate limits.

Through the Flask test client, in this process (the keys CLI against a real web process: e2e/test_keys_cli.py).
"""
from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy.orm import Session

from api.app import create_app
from shared.auth.keys import LiveKeys, create_key
from shared.auth.principal import SYSTEM
from shared.db import unit_of_work
from shared.engine.step import build_runtime
from shared.runtime import Runtime
from shared.settings import Settings

SECRET = "s" * 48


@pytest.fixture(scope="module")
def rsa_pair() -> tuple[str, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return pem, public


@pytest.fixture(scope="module")
def client(settings: Settings, rsa_pair: tuple[str, str]):  # noqa: ANN201
    configured = settings.replace(jwt_secret=SECRET, jwt_public_key=rsa_pair[1], rate_limit_per_minute=30,
                                  redis_prefix=settings.redis_prefix + "-auth")
    rt = build_runtime(configured)
    yield create_app(configured, runtime=rt).test_client(), rt
    rt.close()


def _token(claims: dict, key: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, key, algorithm=alg)


def _sessions(c, token: str, **headers: str):  # noqa: ANN001, ANN202
    return c.get("/v1/sessions", headers={"Authorization": f"Bearer {token}", **headers})


def test_jwt_hs256_and_rs256_act_as_tid_sub(client, rsa_pair) -> None:  # noqa: ANN001
    c, _ = client
    tid, sub = f"t-{secrets.token_hex(3)}", f"u-{secrets.token_hex(3)}"
    hs = _token({"tid": tid, "sub": sub})
    created = c.post("/v1/sessions", json={"agent": "echo"}, headers={"Authorization": f"Bearer {hs}"})
    assert created.status_code == 201
    rs = _token({"tid": tid, "sub": sub}, rsa_pair[0], "RS256")
    listed = _sessions(c, rs).get_json()["data"]
    assert [s["id"] for s in listed] == [created.get_json()["id"]]  # the same principal either way
    other = _token({"tid": tid, "sub": sub + "x"})
    assert _sessions(c, other).get_json()["data"] == []


@pytest.mark.parametrize("claims,key,alg,why", [
    ({"tid": "t", "sub": "u", "exp": int(time.time()) - 5}, SECRET, "HS256", "expired"),
    ({"tid": "t", "sub": "u"}, "wrong-secret-wrong-secret-wrong!", "HS256", "refused"),
    ({"sub": "u"}, SECRET, "HS256", "refused"),
    ({"tid": "t", "sub": "u"}, SECRET, "HS384", "not accepted"),
])
def test_bad_jwts_are_401(client, claims: dict, key: str, alg: str, why: str) -> None:  # noqa: ANN001
    c, _ = client
    token = jwt.encode({"exp": int(time.time()) + 60, **claims}, key, algorithm=alg)
    r = _sessions(c, token)
    assert r.status_code == 401 and why in r.get_json()["error"]["message"]


def test_service_key_names_the_user(client) -> None:  # noqa: ANN001
    c, rt = client
    tenant = f"t-{secrets.token_hex(3)}"
    with unit_of_work(rt.sessions, SYSTEM) as db:  # keys: the system path
        _, service = create_key(db, tenant, None)
    assert _sessions(c, service).status_code == 400  # no X-User-Id
    assert _sessions(c, service, **{"X-User-Id": "bad user id!"}).status_code == 400
    made = c.post("/v1/sessions", json={"agent": "echo"},
                  headers={"Authorization": f"Bearer {service}", "X-User-Id": "alice"})
    assert made.status_code == 201
    assert len(_sessions(c, service, **{"X-User-Id": "alice"}).get_json()["data"]) == 1
    assert _sessions(c, service, **{"X-User-Id": "bob"}).get_json()["data"] == []
    # A user key of the same tenant is that user only; X-User-Id cannot widen it.
    with unit_of_work(rt.sessions, SYSTEM) as db:  # keys: the system path
        _, bob = create_key(db, tenant, "bob")
    assert _sessions(c, bob, **{"X-User-Id": "alice"}).get_json()["data"] == []


def test_rate_limit_answers_429_with_retry_after(client) -> None:  # noqa: ANN001
    c, _ = client
    token = _token({"tid": "t-rl", "sub": f"u-{secrets.token_hex(3)}"})
    if time.time() % 60 > 58:  # stay inside one counting window
        time.sleep(60 - time.time() % 60 + 0.1)
    codes = [_sessions(c, token).status_code for _ in range(32)]
    assert codes[:30] == [200] * 30
    assert codes[30] == 429
    r = _sessions(c, token)
    assert 1 <= int(r.headers["Retry-After"]) <= 60 and r.get_json()["error"]["code"] == "rate_limited"
    # Another principal is unaffected.
    assert _sessions(c, _token({"tid": "t-rl", "sub": "someone-else"})).status_code == 200


def _window_start() -> None:
    if time.time() % 60 > 40:  # stay inside one counting window (under load a test may take seconds)
        time.sleep(60 - time.time() % 60 + 0.1)


@pytest.fixture
def limited(settings: Settings, runtimes):  # noqa: ANN001, ANN201
    def make(**limits: int):  # noqa: ANN202
        rt = runtimes(redis_prefix=f"{settings.redis_prefix}-rl-{secrets.token_hex(3)}", **limits)
        return create_app(rt.settings, runtime=rt).test_client(), rt
    return make


def test_rotating_x_user_id_on_a_service_key_does_not_escape_the_key_budget(limited) -> None:  # noqa: ANN001
    c, rt = limited(rate_limit_per_minute=5, rate_limit_per_key=8, rate_limit_per_tenant=0)
    tenant = f"t-{secrets.token_hex(3)}"
    with unit_of_work(rt.sessions, SYSTEM) as db:
        _, service = create_key(db, tenant, None)
        _, other_key = create_key(db, tenant, None)
    _window_start()
    codes = [_sessions(c, service, **{"X-User-Id": f"u{i}"}).status_code for i in range(10)]
    assert codes == [200] * 8 + [429] * 2  # every user fresh: only the key's bucket stops it
    r = _sessions(c, service, **{"X-User-Id": "yet-another"})
    body = r.get_json()["error"]
    assert r.status_code == 429 and body["code"] == "rate_limited" and "STEPRUN_RATE_LIMIT_PER_KEY" in body["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert _sessions(c, other_key, **{"X-User-Id": "u0"}).status_code == 200  # another key has its own budget


def test_the_tenant_budget_holds_across_keys(limited) -> None:  # noqa: ANN001
    c, rt = limited(rate_limit_per_minute=0, rate_limit_per_key=0, rate_limit_per_tenant=6)
    tenant = f"t-{secrets.token_hex(3)}"
    with unit_of_work(rt.sessions, SYSTEM) as db:
        keys = [create_key(db, tenant, f"u{i}")[1] for i in range(4)]
        _, elsewhere = create_key(db, f"t-{secrets.token_hex(3)}", "u0")
    _window_start()
    codes = [_sessions(c, keys[i % 4]).status_code for i in range(8)]
    assert codes == [200] * 6 + [429] * 2
    assert "STEPRUN_RATE_LIMIT_PER_TENANT" in _sessions(c, keys[0]).get_json()["error"]["message"]
    assert _sessions(c, elsewhere).status_code == 200


def test_failed_authentications_are_budgeted_per_address_before_any_key_lookup(limited) -> None:  # noqa: ANN001
    c, rt = limited(auth_failures_per_ip=3)
    with unit_of_work(rt.sessions, SYSTEM) as db:
        _, good = create_key(db, f"t-{secrets.token_hex(3)}", "u")
        _, fresh = create_key(db, f"t-{secrets.token_hex(3)}", "u")
    _window_start()
    assert _sessions(c, good).status_code == 200  # now in the key cache
    bad = [_sessions(c, f"sk_bad{i}").status_code for i in range(3)]
    assert bad == [401] * 3
    refused = _sessions(c, "sk_bad-again")
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.get_json()["error"]["code"] == "rate_limited"
    assert "STEPRUN_AUTH_FAILURES_PER_IP" in refused.get_json()["error"]["message"]
    # Refused before the key is looked up: even a good key from this address waits out the window,
    # cached (checked with the rate limits) or not (checked before the lookup).
    assert _sessions(c, good).status_code == 429
    assert _sessions(c, fresh).status_code == 429
    # Another address is not held back.
    assert c.get("/v1/sessions", headers={"Authorization": f"Bearer {good}"},
                 environ_base={"REMOTE_ADDR": "10.9.8.7"}).status_code == 200


def test_x_forwarded_for_counts_only_behind_a_configured_proxy(limited) -> None:  # noqa: ANN001
    def fail(c, xff: str) -> int:  # noqa: ANN001
        return c.get("/v1/sessions", headers={"Authorization": "Bearer sk_nope", "X-Forwarded-For": xff},
                     environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code

    untrusted, _ = limited(auth_failures_per_ip=2, trusted_proxies=0)
    behind_proxy, _ = limited(auth_failures_per_ip=2, trusted_proxies=1)
    _window_start()
    # No trusted proxy: a client forging X-Forwarded-For is still counted at its own address.
    c = untrusted
    assert [fail(c, f"192.0.2.{i}") for i in range(3)] == [401, 401, 429]
    # One trusted proxy (10.0.0.1): the address it appended is the client; what the client claimed is not.
    c = behind_proxy
    assert [fail(c, f"6.6.6.{i}, 198.51.100.7") for i in range(3)] == [401, 401, 429]
    assert fail(c, "198.51.100.8") == 401  # another client behind the same proxy


def test_the_sockets_of_one_key_recheck_it_with_one_lookup(rt: Runtime) -> None:
    """When a key's answer runs out, its sockets (opened together, rechecking together) wait for one lookup
    instead of each taking a connection of the system pool; a failed lookup leaves each to its own."""
    with unit_of_work(rt.sessions, SYSTEM) as db:
        key, _ = create_key(db, f"t-{secrets.token_hex(3)}", "u")
        key_id = key.id
    lookups: list[float] = []
    fail = threading.Event()

    @contextmanager
    def system() -> Iterator[Session]:
        lookups.append(time.monotonic())
        with unit_of_work(rt.sessions, SYSTEM) as db:
            time.sleep(0.3)  # a slow database: the other rechecks arrive meanwhile
            if fail.is_set():
                raise RuntimeError("database unavailable")
            yield db

    live = LiveKeys(ttl=60)
    answers: list[bool | BaseException] = []

    def recheck() -> None:
        try:
            answers.append(live.is_live(system, key_id))
        except BaseException as exc:  # noqa: BLE001 - collected
            answers.append(exc)

    def together(n: int) -> None:
        threads = [threading.Thread(target=recheck) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)

    together(20)
    assert answers == [True] * 20 and len(lookups) == 1
    together(5)  # within the answer's ttl: no lookup at all
    assert len(lookups) == 1
    live.forget(key_id)
    fail.set()
    answers.clear()
    together(4)  # the lookup fails: every caller sees an error (each retries later), none waits forever
    assert len(answers) == 4 and all(isinstance(a, RuntimeError) for a in answers)
    assert live.is_live(lambda: unit_of_work(rt.sessions, SYSTEM), key_id) is True  # nothing bad was cached
