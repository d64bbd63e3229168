"""The console's sign-in: a signed session cookie, re-checked against the admin key on every request.

- The cookie holds the admin key's id, its tenant and the session's CSRF
  token, signed with STEPRUN_SECRET_KEY (itsdangerous, with a timestamp:
  STEPRUN_CONSOLE_SESSION_SECONDS). Never the key itself.
- Every request looks the key up again: revoking it signs its sessions out at once.
- Cookies are HttpOnly and SameSite=Strict (Secure over HTTPS, or with
  STEPRUN_CONSOLE_SECURE_COOKIE). Every form carries a CSRF token: the
  session's, or before sign-in a random one that must match its own cookie
  (double submit), so a third-party page can neither sign someone in nor act
  for them.
"""
from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from flask import g, request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from werkzeug.wrappers import Response

from api.context import runtime
from shared.auth.principal import SYSTEM, TenantAdmin
from shared.db import unit_of_work
from shared.errors import StepRunError, Unavailable
from shared.models import ApiKey

SESSION_COOKIE = "steprun_console"
SIGN_IN_COOKIE = "steprun_console_csrf"
PATH = "/console"


class CsrfRefused(StepRunError):
    status, code = 403, "csrf_refused"


@dataclass(frozen=True)
class ConsoleSession:
    key_id: str
    tenant_id: str
    csrf: str

    @property
    def admin(self) -> TenantAdmin:
        return TenantAdmin(self.tenant_id)


def _serializer() -> URLSafeTimedSerializer:
    secret = runtime().settings.secret_key
    if not secret:
        raise Unavailable("the console is disabled: set STEPRUN_SECRET_KEY (the same value on every web process)")
    return URLSafeTimedSerializer(secret, salt="steprun-console-session")


def current() -> ConsoleSession | None:
    """The signed-in session of this request, or None (no cookie, bad signature, expired, key revoked)."""
    if "console" in g:
        return g.console
    g.console = None
    raw = request.cookies.get(SESSION_COOKIE)
    if raw:
        try:
            data = _serializer().loads(raw, max_age=int(runtime().settings.console_session_seconds))
        except BadSignature:  # includes SignatureExpired
            data = None
        if isinstance(data, dict) and _live_admin_key(data.get("k"), data.get("t")):
            g.console = ConsoleSession(data["k"], data["t"], data["c"])
    return g.console


def _live_admin_key(key_id: object, tenant_id: object) -> bool:
    if not isinstance(key_id, str) or not isinstance(tenant_id, str):
        return False
    with unit_of_work(runtime().sessions, SYSTEM) as db:  # keys: the system path only
        row = db.get(ApiKey, key_id)
        return bool(row and row.admin and row.revoked_at is None and row.tenant_id == tenant_id)


def _cookie(response: Response, name: str, value: str, max_age: float | None) -> None:
    secure = request.is_secure or runtime().settings.console_secure_cookie
    response.set_cookie(name, value, max_age=None if max_age is None else int(max_age), path=PATH,
                        secure=secure, httponly=True, samesite="Strict")


def sign_in(response: Response, key_id: str, tenant_id: str) -> None:
    token = _serializer().dumps({"k": key_id, "t": tenant_id, "c": secrets.token_urlsafe(32)})
    _cookie(response, SESSION_COOKIE, token, runtime().settings.console_session_seconds)
    response.delete_cookie(SIGN_IN_COOKIE, path=PATH)


def sign_out(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path=PATH)


def sign_in_token(response: Response) -> str:
    """The sign-in form's CSRF token: the one in this browser's cookie, or a new one set on ``response``."""
    token = request.cookies.get(SIGN_IN_COOKIE, "")
    if len(token) < 32:
        token = secrets.token_urlsafe(32)
        _cookie(response, SIGN_IN_COOKIE, token, None)
    return token


def _sent_token() -> str:
    return request.form.get("csrf_token") or request.headers.get("X-CSRF-Token") or ""


def _same_origin() -> bool:
    """A browser names the page a POST came from; it must be this site (absent: an older browser or a tool)."""
    origin = request.headers.get("Origin")
    # The host only: behind a TLS-terminating proxy the scheme this process sees is not the browser's.
    return origin is None or urlsplit(origin).netloc == request.host


def check_sign_in_csrf() -> None:
    expected = request.cookies.get(SIGN_IN_COOKIE, "")
    if not expected or not _same_origin() or not hmac.compare_digest(_sent_token(), expected):
        raise CsrfRefused("the sign-in form's CSRF token is missing or wrong: reload the page and sign in again")


def check_csrf(session: ConsoleSession) -> None:
    if not _same_origin() or not hmac.compare_digest(_sent_token(), session.csrf):
        raise CsrfRefused("the form's CSRF token is missing or wrong: reload the page and try again")
