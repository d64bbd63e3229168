"""Bearer-key authentication for every /v1 route."""
from __future__ import annotations

import re

from flask import Flask, g, request

from api.context import db
from shared.errors import BadInput, Unauthorized
from shared.keys import Principal, identify_key

USER_ID_RE = re.compile(r"^[\w.@:+-]{1,256}$")


def install_auth(app: Flask) -> None:
    @app.before_request
    def _authenticate() -> None:
        if not request.path.startswith("/v1/"):
            return
        g.principal = authenticate()


def authenticate() -> Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send 'Authorization: Bearer <key>'")
    identity = identify_key(db(), token.strip())
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
