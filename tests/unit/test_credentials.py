"""Credentials in this process: JWT tenant binding and lifetime, stream-token scopes and key ids, the
deployment check on secrets, the shipped infra carrying no usable secret, the streams' recheck timer.

The same against the real processes: tests/e2e/test_credentials.py.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from api.relay import CredentialWatch, recheck_seconds
from shared.auth.jwt import verify_jwt
from shared.auth.principal import Principal
from shared.auth.stream_tokens import mint_stream_token, verify_stream_token
from shared.errors import Unauthorized
from shared.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s" * 48
BOTH = {"DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x", "STEPRUN_SECRET_KEY": "k" * 64}


def _hs(claims: dict[str, Any], key: str = SECRET) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "alice", "iat": now, "exp": now + 60, **claims}, key)


# --- JWTs ---------------------------------------------------------------------------------------------


def test_a_bound_key_refuses_another_tenant() -> None:
    settings = Settings(jwt_secret=SECRET, jwt_tenant="acme")
    assert verify_jwt(settings, _hs({"tid": "acme"})).principal == Principal("acme", "alice")
    with pytest.raises(Unauthorized, match="tenant its signing key speaks for"):
        verify_jwt(settings, _hs({"tid": "globex"}))
    # Unbound (`steprun dev` only): the tenant is the token's.
    assert verify_jwt(Settings(jwt_secret=SECRET), _hs({"tid": "globex"})).principal.tenant_id == "globex"


def test_issuers_are_verified_with_their_own_key_for_their_own_tenant() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    issuers = {"https://acme/": {"tenant": "acme", "public_key": public},
               "https://globex/": {"tenant": "globex", "secret": "g" * 40, "audience": "steprun"}}
    settings = Settings(jwt_issuers=json.dumps(issuers))
    now = int(time.time())
    acme = jwt.encode({"iss": "https://acme/", "tid": "acme", "sub": "a", "exp": now + 60}, pem, algorithm="RS256")
    assert verify_jwt(settings, acme).principal == Principal("acme", "a")
    globex = {"iss": "https://globex/", "tid": "globex", "aud": "steprun"}
    assert verify_jwt(settings, _hs(globex, "g" * 40)).principal.tenant_id == "globex"
    with pytest.raises(Unauthorized):  # the issuer's audience is required
        verify_jwt(settings, _hs({**globex, "aud": "other"}, "g" * 40))
    with pytest.raises(Unauthorized, match="speaks for"):  # globex's key for acme's tenant
        verify_jwt(settings, _hs({**globex, "tid": "acme"}, "g" * 40))
    with pytest.raises(Unauthorized, match="not accepted"):  # HS256 "signed" with acme's public key
        verify_jwt(settings, _forged_hs256(public, {"iss": "https://acme/", "tid": "acme", "sub": "a",
                                                    "exp": now + 60}))
    with pytest.raises(Unauthorized, match="not accepted"):  # no issuer named, and no default key
        verify_jwt(settings, _hs({"tid": "globex"}, "g" * 40))


def _forged_hs256(key: str, claims: dict[str, Any], raw_payload: bytes | None = None) -> str:
    """An HS256 token signed with ``key`` by hand (PyJWT refuses PEM text as an HMAC key)."""
    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(raw_payload or json.dumps(claims).encode())
    return (signing + b"." + b64(hmac.new(key.encode(), signing, hashlib.sha256).digest())).decode()


@pytest.mark.parametrize("payload,why", [
    (b'{"tid":"acme","sub":"a","exp":Infinity}', "must be a number"),
    (b'{"tid":"acme","sub":"a","exp":"9999999999"}', "must be a number"),
    (b'{"tid":"acme","sub":"a","exp":1e300}', "more than 3600 s away"),
    (b'{"tid":"acme","sub":"a","exp":9999999999}', "more than 3600 s away"),
    (b'{"tid":"acme","sub":"a","exp":NaN}', "must be a number"),
])
def test_exp_must_be_a_number_within_the_cap(payload: bytes, why: str) -> None:
    settings = Settings(jwt_secret=SECRET, jwt_tenant="acme")
    with pytest.raises(Unauthorized, match=why):
        verify_jwt(settings, _forged_hs256(SECRET, {}, payload))


def test_the_lifetime_cap_is_a_setting() -> None:
    now = int(time.time())
    token = _hs({"tid": "acme", "iat": now, "exp": now + 7200})
    with pytest.raises(Unauthorized, match="more than 3600 s"):
        verify_jwt(Settings(jwt_secret=SECRET, jwt_tenant="acme"), token)
    verified = verify_jwt(Settings(jwt_secret=SECRET, jwt_tenant="acme", jwt_max_lifetime=7200), token)
    assert verified.expires_at == now + 7200


# --- stream tokens ---------------------------------------------------------------------------------------


def test_stream_tokens_are_read_only_unless_minted_for_writing() -> None:
    who = Principal("acme", "alice")
    read, _ = mint_stream_token(SECRET, who, "ses_1", 60, key_id="key_1")
    grant = verify_stream_token(SECRET, read, "ses_1")
    assert (grant.principal, grant.key_id, grant.write) == (who, "key_1", False)
    write, _ = mint_stream_token(SECRET, who, "ses_1", 60, key_id="key_1", write=True)
    assert verify_stream_token(SECRET, write, "ses_1").write is True


def test_a_token_of_the_old_format_is_read_only() -> None:
    payload = base64.urlsafe_b64encode(json.dumps(
        {"t": "acme", "u": "alice", "s": "ses_1", "e": int(time.time()) + 60}).encode()).rstrip(b"=").decode()
    sig = base64.urlsafe_b64encode(hmac.new(SECRET.encode(), b"stream.v1." + payload.encode(),
                                            hashlib.sha256).digest()).rstrip(b"=").decode()
    grant = verify_stream_token(SECRET, f"{payload}.{sig}", "ses_1")
    assert grant.write is False and grant.key_id is None


# --- the deployment check on secrets --------------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    ({"STEPRUN_SECRET_KEY": "change-me-to-a-long-random-string"}, "STEPRUN_SECRET_KEY is a placeholder"),
    ({"STEPRUN_SECRET_KEY": "CHANGE-ME-to-a-long-random-string"}, "STEPRUN_SECRET_KEY is a placeholder"),
    ({"STEPRUN_SECRET_KEY": "x" * 31}, "STEPRUN_SECRET_KEY is 31 bytes long; it must be at least 32"),
    ({"STEPRUN_JWT_SECRET": "x", "STEPRUN_JWT_TENANT": "acme"}, "STEPRUN_JWT_SECRET is 1 bytes long"),
    ({"STEPRUN_JWT_SECRET": "j" * 40}, "STEPRUN_JWT_TENANT is not"),
    ({"STEPRUN_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----"}, "STEPRUN_JWT_TENANT is not"),
    ({"STEPRUN_JWT_ISSUERS": '{"https://a/": {"tenant": "a", "secret": "short"}}'}, "issuer 'https://a/'"),
])
def test_production_refuses_placeholder_and_short_secrets(extra: dict[str, str], message: str) -> None:
    for process in ("web", "worker", "scheduler"):
        with pytest.raises(SettingsError, match=message):
            Settings.from_env({**BOTH, **extra}).check_deployment(process)


def test_a_refusal_says_how_to_make_a_secret() -> None:
    with pytest.raises(SettingsError, match=r"secrets\.token_hex\(32\)"):
        Settings.from_env({**BOTH, "STEPRUN_SECRET_KEY": "tiny"}).check_deployment("web")


def test_a_good_configuration_starts() -> None:
    Settings.from_env({**BOTH, "STEPRUN_JWT_SECRET": "j" * 32, "STEPRUN_JWT_TENANT": "acme"}).check_deployment("web")
    issuers = json.dumps({"https://a/": {"tenant": "a", "secret": "a" * 32}})
    Settings.from_env({**BOTH, "STEPRUN_JWT_ISSUERS": issuers}).check_deployment("web")


@pytest.mark.parametrize("raw,message", [
    ("not json", "is not JSON"),
    ("[]", "must be a JSON object"),
    ('{"https://a/": {"secret": "' + "a" * 32 + '"}}', "tenant must name"),
    ('{"https://a/": {"tenant": "a"}}', "exactly one of"),
    ('{"https://a/": {"tenant": "a", "secret": "x", "public_key": "y"}}', "exactly one of"),
    ('{"https://a/": {"tenant": "a", "secret": "x", "kid": "1"}}', "unknown field"),
])
def test_a_bad_issuers_mapping_is_a_settings_error(raw: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({"STEPRUN_JWT_ISSUERS": raw})


def test_the_shipped_infra_carries_no_usable_secret() -> None:
    compose = yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())
    value = compose["x-steprun"]["environment"]["STEPRUN_SECRET_KEY"]
    assert value.startswith("${STEPRUN_SECRET_KEY:?"), value  # compose refuses to start without it
    docs = list(yaml.safe_load_all((ROOT / "infra" / "k8s" / "config.yaml").read_text()))
    secret = next(d for d in docs if d and d["kind"] == "Secret")
    assert secret["stringData"]["STEPRUN_SECRET_KEY"] == ""  # the web pods refuse to start until it is set
    with pytest.raises(SettingsError):
        Settings.from_env({**BOTH, "STEPRUN_SECRET_KEY": ""}).check_deployment("web")


# --- the streams' recheck timer ---------------------------------------------------------------------------------


def test_streams_recheck_within_the_key_cache_window() -> None:
    assert recheck_seconds(Settings(key_cache_seconds=30)) == 15
    assert recheck_seconds(Settings(key_cache_seconds=0)) == 1.0
    calls: list[float] = []

    def check() -> tuple[str, str] | None:
        calls.append(time.monotonic())
        return None

    watch = CredentialWatch(check, Settings(key_cache_seconds=30))
    assert watch.problem() is None and calls == []  # not due yet: no lookup per frame
    assert 14 < watch.wait_bound(60) <= 15
    expiring = CredentialWatch(lambda: ("token_expired", "gone"), Settings(key_cache_seconds=30),
                               expires_at=time.time() + 0.3)
    assert expiring.wait_bound(60) <= 0.3  # a stream sleeps no later than its token's expiry
    time.sleep(0.35)
    assert expiring.problem() == ("token_expired", "gone")


def test_a_failed_recheck_does_not_end_the_stream() -> None:
    def down() -> tuple[str, str] | None:
        raise ConnectionError("postgres is away")

    watch = CredentialWatch(down, Settings(key_cache_seconds=1))
    watch.due = 0
    assert watch.problem() is None
