"""Signing secrets and the signature headers, as OpenAI (and the Standard Webhooks spec) define them.

``webhook-signature`` is ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``
keyed by the base64-decoded part of ``whsec_<base64>``; several space-separated
signatures are sent while a rotated-out secret is still honoured.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable

PREFIX = "whsec_"


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_hint(secret: str) -> str:
    """What the API shows of a secret after it was handed out: enough to tell two apart."""
    return f"{PREFIX}…{secret[-4:]}"


def signature(secret: str, webhook_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret[len(PREFIX):]) if secret.startswith(PREFIX) else secret.encode()
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secrets_: Iterable[str], webhook_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The headers of one delivery attempt (its timestamp is the attempt's, so retries stay verifiable)."""
    return {
        "Content-Type": "application/json",
        "User-Agent": "steprun-webhooks/1",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, webhook_id, timestamp, body) for s in secrets_),
    }
