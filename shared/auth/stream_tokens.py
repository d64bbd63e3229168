"""Short-lived stream tokens: how a browser authenticates a WebSocket or an EventSource.

Browsers cannot set an Authorization header on either, so the app's backend
(holding the real key) mints a token for one session, and the page passes it
as ``?token=``. A token is bound to (tenant, user, session) and expires after
a few minutes: leaked from a URL or a log, it opens one session's stream for
a short while and nothing else.

A token is read-only unless it says otherwise: a socket it opens streams
events and takes ``subscribe`` and ``ping`` frames, and refuses ``turn``,
``cancel`` and ``resume``. A write token is minted only when asked for
(``{"scope": "write"}``) by a caller holding the real credential. A token minted
with an API key carries that key's id and dies with it: once the key is revoked,
the token is refused and the sockets it opened are closed (4401).

Format: ``base64url(payload) "." base64url(HMAC-SHA256(secret, "stream.v1." + payload))``
where the payload is compact JSON ``{"t": tenant, "u": user, "s": session, "e": expiry, "k": key id or
null, "w": write}``. Stateless, so any API process with the same ``STEPRUN_SECRET_KEY`` verifies it (the
key's liveness is one indexed lookup, cached like the keys themselves).
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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class StreamGrant:
    """What a valid stream token allows: one session's stream as ``principal``."""

    principal: Principal
    expires_at: float
    # The API key that minted it (None: minted with a JWT, or by the console's admin session without one).
    key_id: str | None = None
    # Whether its socket may create, cancel and resume turns; False: read-only.
    write: bool = False


def mint_stream_token(secret: str, who: Principal, session_id: str, ttl: float, now: float | None = None, *,
                      key_id: str | None = None, write: bool = False) -> tuple[str, float]:
    """A token for ``who`` to stream ``session_id``; returns (token, expiry as a Unix time).

    ``key_id``: the key whose authority it carries (refused once that key is revoked); ``write``: its
    socket may send turn, cancel and resume frames.
    """
    expires = int((time.time() if now is None else now) + ttl)
    payload = _b64(json.dumps({"t": who.tenant_id, "u": who.user_id, "s": session_id, "e": expires,
                               "k": key_id, "w": bool(write)}, separators=(",", ":")).encode())
    return f"{payload}.{_sign(secret, payload)}", float(expires)


def verify_stream_token(secret: str, token: str, session_id: str, now: float | None = None) -> StreamGrant:
    """What a valid token grants, for ``session_id`` only; Unauthorized otherwise.

    The caller still checks that ``key_id`` (if any) is a live key.
    """
    payload, _, signature = token.partition(".")
    if not payload or not signature or len(token) > MAX_TOKEN_CHARS:
        raise Unauthorized("the stream token is malformed")
    if not hmac.compare_digest(signature, _sign(secret, payload)):
        raise Unauthorized("the stream token is not valid (bad signature)")
    try:
        claims = json.loads(_unb64(payload))
        tenant, user, session, expires = claims["t"], claims["u"], claims["s"], claims["e"]
        key_id, write = claims.get("k"), claims.get("w", False)
        if (isinstance(expires, bool) or not isinstance(expires, (int, float))
                or not isinstance(tenant, str) or not isinstance(user, str)
                or not (key_id is None or isinstance(key_id, str)) or not isinstance(write, bool)):
            raise TypeError("a claim has the wrong type")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        raise Unauthorized("the stream token is malformed") from None
    if session != session_id:
        # Same answer whatever the reason, so a token reveals nothing about other sessions.
        raise Unauthorized("the stream token is not valid for this session")
    if expires <= (time.time() if now is None else now):
        raise Unauthorized("the stream token has expired; mint a new one with POST "
                           f"/v1/sessions/{session_id}/stream-token")
    return StreamGrant(Principal(tenant, user), float(expires), key_id, write)


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
