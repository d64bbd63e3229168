"""End-user JWTs: HS256 with a shared secret or RS256 with a public key. Claims `tid`, `sub`, `exp`.

Every key speaks for one tenant: STEPRUN_JWT_SECRET / STEPRUN_JWT_PUBLIC_KEY for
STEPRUN_JWT_TENANT, and each issuer of STEPRUN_JWT_ISSUERS for its own tenant. A
token whose `tid` is not its key's tenant is refused, so whoever holds one
tenant's signing key cannot speak for another. (Unbound keys take `tid` as is:
`steprun dev` only; a production process refuses to start with one.)

A token's lifetime is capped (STEPRUN_JWT_MAX_LIFETIME): `exp` must be a number,
no further than that from now, nor from `iat` when the token has one.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

import jwt

from shared.auth.principal import Principal
from shared.errors import BadInput, Unauthorized
from shared.settings import Settings, parse_jwt_issuers

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Clock difference tolerated between the issuer and us (for `iat`, `nbf` and the lifetime cap), seconds.
LEEWAY_SECONDS = 30.0


@dataclass(frozen=True)
class _Key:
    key: str
    alg: str
    # The tenant this key speaks for; None: unbound (`steprun dev` only).
    tenant: str | None
    audience: str | None


@dataclass(frozen=True)
class VerifiedJwt:
    principal: Principal
    # Unix time the token stops being valid: a stream it opened is closed then.
    expires_at: float


def _storable_id(value: str) -> bool:
    """An id Postgres can store and a log line can print: no control character, no unpaired surrogate."""
    if _CONTROL.search(value):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def jwt_enabled(settings: Settings) -> bool:
    return bool(settings.jwt_secret or settings.jwt_public_key or settings.jwt_issuers)


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and not token.startswith("sr_")


def _keys_for(settings: Settings, issuer: Any) -> list[_Key]:
    """The keys that may have signed a token naming ``issuer``: its own if listed, else the default ones."""
    issuers = parse_jwt_issuers(settings.jwt_issuers)
    if isinstance(issuer, str) and issuer in issuers:
        bound = issuers[issuer]
        audience = bound.audience or settings.jwt_audience
        if bound.secret:
            return [_Key(bound.secret, "HS256", bound.tenant, audience)]
        return [_Key(bound.public_key or "", "RS256", bound.tenant, audience)]
    keys = []
    if settings.jwt_secret:
        keys.append(_Key(settings.jwt_secret, "HS256", settings.jwt_tenant, settings.jwt_audience))
    if settings.jwt_public_key:
        keys.append(_Key(settings.jwt_public_key, "RS256", settings.jwt_tenant, settings.jwt_audience))
    return keys


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Unauthorized(f"the JWT's {name!r} claim must be a number (seconds since the epoch)")
    return float(value)


def _check_times(settings: Settings, claims: dict[str, Any]) -> float:
    """Validate exp, iat and nbf ourselves (PyJWT takes a string of digits or 1e300 for `exp`); returns exp."""
    now = time.time()
    exp, iat, nbf = _number(claims, "exp"), _number(claims, "iat"), _number(claims, "nbf")
    assert exp is not None  # required by decode
    if exp <= now:  # no leeway here: a token is never honoured past its own exp
        raise Unauthorized("the JWT has expired")
    cap = settings.jwt_max_lifetime
    if exp - now > cap + LEEWAY_SECONDS:
        raise Unauthorized(f"the JWT's 'exp' is more than {int(cap)} s away (STEPRUN_JWT_MAX_LIFETIME); "
                           "issue shorter-lived tokens")
    if iat is not None:
        if iat > now + LEEWAY_SECONDS:
            raise Unauthorized("the JWT's 'iat' is in the future")
        if exp - iat > cap + LEEWAY_SECONDS:
            raise Unauthorized(f"the JWT lives {int(exp - iat)} s ('exp' - 'iat'), more than {int(cap)} s "
                               "(STEPRUN_JWT_MAX_LIFETIME); issue shorter-lived tokens")
    if nbf is not None and nbf > now + LEEWAY_SECONDS:
        raise Unauthorized("the JWT is not valid yet ('nbf')")
    return exp


def verify_jwt(settings: Settings, token: str) -> VerifiedJwt:
    """Verify the signature, the key's tenant, the lifetime and (if configured) the audience."""
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise Unauthorized("the token is not a valid JWT") from None
    # The key is chosen by the issuer the token names, the algorithm by which key we hold: never by the token alone.
    matching = [k for k in _keys_for(settings, unverified.get("iss")) if k.alg == header.get("alg")]
    if not matching:
        raise Unauthorized(f"JWT algorithm {header.get('alg')!r} is not accepted here")
    key = matching[0]
    try:
        claims = jwt.decode(
            token, key.key, algorithms=[key.alg], audience=key.audience,
            options={"require": ["exp", "sub", "tid"], "verify_aud": key.audience is not None,
                     "verify_exp": False, "verify_iat": False, "verify_nbf": False},
        )
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"the JWT was refused: {exc}") from None
    expires_at = _check_times(settings, claims)
    tid, sub = claims.get("tid"), claims.get("sub")
    if not isinstance(tid, str) or not isinstance(sub, str) or not tid or not sub or len(tid) > 128 or len(sub) > 256:
        raise Unauthorized("the JWT's 'tid' and 'sub' must be non-empty strings")
    for name, value in (("tid", tid), ("sub", sub)):
        if not _storable_id(value):
            raise BadInput(f"the JWT's {name!r} claim holds a control character or an unpaired surrogate",
                           field=name)
    if key.tenant is not None and tid != key.tenant:
        # The same answer whichever tenant it named: a key speaks for its own tenant only.
        raise Unauthorized("the JWT's 'tid' is not the tenant its signing key speaks for")
    return VerifiedJwt(Principal(tid, sub), expires_at)


def principal_from_jwt(settings: Settings, token: str) -> Principal:
    """The principal (tid, sub) of a valid token; Unauthorized otherwise."""
    return verify_jwt(settings, token).principal
