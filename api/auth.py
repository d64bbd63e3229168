"""Bearer-key authentication for every /v1 route."""
from __future__ import annotations

import re

from flask import Flask, g, request

from api.context import db, runtime
from shared.db import set_scope
from shared.errors import BadInput, RateLimited, Unauthorized
from shared.jwt_auth import jwt_enabled, looks_like_jwt, principal_from_jwt
from shared.keys import Principal, identify_key

USER_ID_RE = re.compile(r"^[\w.@:+-]{1,256}$")


def install_auth(app: Flask) -> None:
    @app.before_request
    def _authenticate() -> None:
        if not request.path.startswith("/v1/"):
            return
        g.principal = authenticate()
        # Every later transaction of this request sees this principal's rows only.
        set_scope(db(), g.principal)
        enforce_rate_limit(g.principal)


def enforce_rate_limit(who: Principal) -> None:
    rt = runtime()
    limit = rt.settings.rate_limit_per_minute
    if limit <= 0:
        return
    retry_after = rt.limiter.hit(f"{who.tenant_id}:{who.user_id}", limit)
    if retry_after is not None:
        raise RateLimited(f"more than {limit} requests a minute; slow down", retry_after=retry_after)


def authenticate() -> Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("send 'Authorization: Bearer <key>'")
    if len(token) > 4096:
        raise Unauthorized("the bearer token is too long")
    settings = runtime().settings
    if jwt_enabled(settings) and looks_like_jwt(token):
        return principal_from_jwt(settings, token)
    identity = identify_key(db(), token)
    db().rollback()  # release the connection until the view needs one
    if identity is None:
        raise Unauthorized("the key is not valid (unknown or revoked)")
    if identity.user_id is not None:
        return Principal(identity.tenant_id, identity.user_id)
    user_id = request.headers.get("X-User-Id", "")
    if not user_id:
        raise BadInput("a service key must name the user in the X-User-Id header", field="X-User-Id")
    if not USER_ID_RE.match(user_id):
        raise BadInput("X-User-Id must be 1-256 characters of letters, digits and . @ : + - _",
                       field="X-User-Id")
    return Principal(identity.tenant_id, user_id)
