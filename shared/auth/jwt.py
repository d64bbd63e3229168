"""End-user JWTs: HS256 with a shared secret or RS256 with a public key. Claims `tid`, `sub`, `exp`."""
from __future__ import annotations

import re

import jwt

from shared.auth.principal import Principal
from shared.errors import BadInput, Unauthorized
from shared.settings import Settings

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
    return bool(settings.jwt_secret or settings.jwt_public_key)


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and not token.startswith("sr_")


def principal_from_jwt(settings: Settings, token: str) -> Principal:
    """Verify the signature, expiry and (if configured) audience; the principal is (tid, sub)."""
    keys: list[tuple[str, str]] = []
    if settings.jwt_secret:
        keys.append((settings.jwt_secret, "HS256"))
    if settings.jwt_public_key:
        keys.append((settings.jwt_public_key, "RS256"))
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise Unauthorized("the token is not a valid JWT") from None
    # The algorithm is chosen by which key we hold, never by the token alone.
    matching = [(k, alg) for k, alg in keys if alg == header.get("alg")]
    if not matching:
        raise Unauthorized(f"JWT algorithm {header.get('alg')!r} is not accepted here")
    key, alg = matching[0]
    try:
        claims = jwt.decode(
            token, key, algorithms=[alg], audience=settings.jwt_audience,
            options={"require": ["exp", "sub", "tid"], "verify_aud": settings.jwt_audience is not None},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the JWT has expired") from None
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"the JWT was refused: {exc}") from None
    tid, sub = claims.get("tid"), claims.get("sub")
    if not isinstance(tid, str) or not isinstance(sub, str) or not tid or not sub or len(tid) > 128 or len(sub) > 256:
        raise Unauthorized("the JWT's 'tid' and 'sub' must be non-empty strings")
    for name, value in (("tid", tid), ("sub", sub)):
        if not _storable_id(value):
            raise BadInput(f"the JWT's {name!r} claim holds a control character or an unpaired surrogate",
                           field=name)
    return Principal(tid, sub)
