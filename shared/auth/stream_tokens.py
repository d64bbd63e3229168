"""Short-lived stream tokens: how a browser authenticates a WebSocket or an EventSource.

Browsers cannot set an Authorization header on either, so the app's backend
(holding the real key) mints a token for one session, and the page passes it
as ``?token=``. A token is bound to (tenant, user, session) and expires after
a few minutes: leaked from a URL or a log, it opens one session's stream for
a short while and nothing else.

Format: ``base64url(payload) "." base64url(HMAC-SHA256(secret, "stream.v1." + payload))``
where the payload is compact JSON ``{"t": tenant, "u": user, "s": session, "e": expiry}``.
Stateless, so any API process with the same ``STEPRUN_SECRET_KEY`` verifies it.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time

from shared.auth.principal import Principal
from shared.errors import Unauthorized

_CONTEXT = b"stream.v1."
MAX_TOKEN_CHARS = 2048


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, payload: str) -> str:
    return _b64(hmac.new(secret.encode(), _CONTEXT + payload.encode(), hashlib.sha256).digest())


def mint_stream_token(secret: str, who: Principal, session_id: str, ttl: float,
                      now: float | None = None) -> tuple[str, float]:
    """A token for ``who`` to stream ``session_id``; returns (token, expiry as a Unix time)."""
    expires = int((time.time() if now is None else now) + ttl)
    payload = _b64(json.dumps({"t": who.tenant_id, "u": who.user_id, "s": session_id, "e": expires},
                              separators=(",", ":")).encode())
    return f"{payload}.{_sign(secret, payload)}", float(expires)


def verify_stream_token(secret: str, token: str, session_id: str, now: float | None = None) -> Principal:
    """The principal a valid token names, for ``session_id`` only; Unauthorized otherwise."""
    payload, _, signature = token.partition(".")
    if not payload or not signature or len(token) > MAX_TOKEN_CHARS:
        raise Unauthorized("the stream token is malformed")
    if not hmac.compare_digest(signature, _sign(secret, payload)):
        raise Unauthorized("the stream token is not valid (bad signature)")
    try:
        claims = json.loads(_unb64(payload))
        tenant, user, session, expires = claims["t"], claims["u"], claims["s"], float(claims["e"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise Unauthorized("the stream token is malformed") from None
    if session != session_id:
        # Same answer whatever the reason, so a token reveals nothing about other sessions.
        raise Unauthorized("the stream token is not valid for this session")
    if expires <= (time.time() if now is None else now):
        raise Unauthorized("the stream token has expired; mint a new one with POST "
                           f"/v1/sessions/{session_id}/stream-token")
    return Principal(str(tenant), str(user))


def dev_secret_key(data_dir: str) -> str:
    """The embedded mode's secret: made once and kept in the data dir, so tokens survive a restart."""
    path = os.path.join(data_dir, "secret-key")
    if os.path.exists(path):
        with open(path) as f:
            secret = f.read().strip()
        if secret:
            return secret
    os.makedirs(data_dir, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    # Created private from the start, never readable by others even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret
