"""Bearer-key authentication for every /v1 route."""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Flask, current_app, g, request

from api.context import db, runtime
from shared.auth.jwt import jwt_enabled, looks_like_jwt, verify_jwt
from shared.auth.keys import identify_key
from shared.auth.principal import SYSTEM, Principal, Tenant
from shared.auth.stream_tokens import verify_stream_token
from shared.db import set_scope, unit_of_work
from shared.errors import BadInput, Forbidden, RateLimited, Unauthorized, Unavailable
from shared.runtime import Runtime

log = logging.getLogger(__name__)
USER_ID_RE = re.compile(r"[\w.@:+-]{1,256}")
STREAM_TOKEN_MARK = "accepts_stream_token"
TENANT_WIDE_MARK = "tenant_wide"
View = TypeVar("View", bound=Callable[..., Any])
# /langgraph: LangGraph's API (DESIGN 10.2), whose clients send the key as x-api-key.
AUTHENTICATED_PREFIXES = ("/v1/", "/langgraph/")


@dataclass(frozen=True)
class Credential:
    """What authenticated a request, so a stream it opens can be rechecked while it lasts."""

    kind: str  # "key", "jwt" or "stream_token"
    # The API key whose authority it is (a key, or the key a stream token was minted with).
    key_id: str | None = None
    # Unix time it stops being valid (a JWT's or a stream token's exp); None: while the key lives.
    expires_at: float | None = None
    # False for a read-only stream token: its socket may not create, cancel or resume turns.
    write: bool = True

    def problem(self, rt: Runtime, now: float | None = None) -> tuple[str, str] | None:
        """None while it is still valid; else (reason, message) for the 4401 close or the SSE error event."""
        if self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at:
            what = "stream token" if self.kind == "stream_token" else "token" if self.kind == "jwt" else "key"
            return "token_expired", f"the {what} that opened this stream has expired; reconnect with a new one"
        if self.key_id is not None and not rt.live_keys.is_live(lambda: unit_of_work(rt.sessions, SYSTEM), self.key_id):
            return "key_revoked", "the key that opened this stream was revoked"
        return None


def credential() -> Credential:
    return g.get("credential") or Credential("key")


# What a client address may look like in X-Forwarded-For (it names a rate-limit bucket).
ADDRESS_RE = re.compile(r"[0-9A-Fa-f.:\[\]]{1,64}")


def install_auth(app: Flask) -> None:
    @app.before_request
    def _authenticate() -> None:
        if not request.path.startswith(AUTHENTICATED_PREFIXES):
            return
        view = current_app.view_functions.get(request.endpoint or "")
        with auth_failures_counted():
            if getattr(view, TENANT_WIDE_MARK, False):
                g.tenant = authenticate_tenant()
            else:
                g.principal = stream_token_principal() or authenticate()
        if getattr(view, TENANT_WIDE_MARK, False):
            set_scope(db(), g.tenant)
            enforce_rate_limit(Principal(g.tenant.tenant_id, ""))
            return
        # Every later transaction of this request sees this principal's rows only (and, through a service
        # key, may write the tenant's tenant-wide documents).
        set_scope(db(), g.principal, service=g.get("service_key", False))
        enforce_rate_limit(g.principal)


def client_address() -> str:
    """The client's address: the socket's peer, or with STEPRUN_TRUSTED_PROXIES=n the n-th X-Forwarded-For
    entry from the right (each trusted proxy appends the address it saw; entries left of those are the client's
    own claims and are ignored, as werkzeug's ProxyFix does)."""
    peer = request.remote_addr or ""
    trusted = runtime().settings.trusted_proxies
    if trusted <= 0:
        return peer
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
    if len(hops) < trusted or not ADDRESS_RE.fullmatch(hops[-trusted]):
        return peer
    return hops[-trusted]


def _too_many_failures(limit: int, retry_after: float) -> RateLimited:
    return RateLimited(f"more than {limit} failed authentications a minute from this address "
                       "(STEPRUN_AUTH_FAILURES_PER_IP); wait before trying again", retry_after=retry_after)


@contextmanager
def auth_failures_counted() -> Iterator[None]:
    """Count each 401 against the client address's budget (STEPRUN_AUTH_FAILURES_PER_IP); past it, 429.

    An address past its budget is refused everything, its good keys too, and never costs a key lookup:
    a key that needs one (not in the key cache) is checked first (:func:`refuse_blocked_address`); a
    cached key, a JWT or a stream token is checked with the request's rate-limit counting, in the same
    round trip to Redis (:func:`enforce_rate_limit`); a failure past the budget is a 429, not a 401.
    """
    rt = runtime()
    limit = rt.settings.auth_failures_per_ip
    if limit <= 0:
        yield
        return
    bucket = f"authfail:{client_address()}"
    g.auth_failures = (bucket, limit)  # to check, once, before a key lookup or with the rate limits
    try:
        yield
    except Unauthorized:
        g.pop("auth_failures", None)
        retry_after = _fail_open(lambda: rt.limiter.hit(bucket, limit))
        if retry_after is not None:
            raise _too_many_failures(limit, retry_after) from None
        raise


def _fail_open(check: Callable[[], float | None]) -> float | None:
    """A failed-authentication check; None (let it through) if Redis cannot answer."""
    import redis

    try:
        return check()
    except (redis.ConnectionError, redis.TimeoutError):
        log.warning("failed-authentication budget not checked: the event store is unavailable")
        return None


def refuse_blocked_address() -> None:
    """Before a key lookup: 429 if the client address is past its budget of failed authentications."""
    budget = g.pop("auth_failures", None)
    if budget is not None:
        retry_after = _fail_open(lambda: runtime().limiter.peek(*budget))
        if retry_after is not None:
            raise _too_many_failures(budget[1], retry_after)


def accepts_stream_token(view: View) -> View:
    """Mark a route (the WebSocket and SSE streams) as also accepting ``?token=<stream token>``."""
    # A function attribute, kept in its __dict__ (functools.wraps copies it onto flask-sock's wrapper).
    view.__dict__[STREAM_TOKEN_MARK] = True
    return view


def tenant_wide(view: View) -> View:
    """Mark a route as acting for the whole tenant (webhook endpoints): service keys only, no X-User-Id."""
    view.__dict__[TENANT_WIDE_MARK] = True
    return view


def authenticate_tenant() -> Tenant:
    """The tenant of a service key; 403 for a key (or JWT) that acts as one user."""
    who = authenticate(require_user=False)
    if not g.get("service_key", False):
        raise Forbidden("webhook endpoints belong to the tenant: use a service key (a user key cannot manage them)")
    return Tenant(who.tenant_id)


def stream_token_principal() -> Principal | None:
    """The principal of a ``?token=`` on a route that accepts one and has no Authorization header."""
    token = request.args.get("token")
    view = current_app.view_functions.get(request.endpoint or "")
    if token is None or "Authorization" in request.headers or not getattr(view, STREAM_TOKEN_MARK, False):
        return None
    rt = runtime()
    secret = rt.settings.secret_key
    if not secret:
        raise Unavailable("stream tokens are disabled: STEPRUN_SECRET_KEY is not set")
    grant = verify_stream_token(secret, token, (request.view_args or {}).get("session_id", ""))
    # A token carries its key's authority, no more and no longer: it dies with the key.
    if grant.key_id is not None and not rt.live_keys.is_live(lambda: unit_of_work(rt.sessions, SYSTEM), grant.key_id):
        raise Unauthorized("the key this stream token was minted with has been revoked")
    g.credential = Credential("stream_token", grant.key_id, grant.expires_at, grant.write)
    return grant.principal


def enforce_rate_limit(who: Principal) -> None:
    """Count one request against its user's, its key's and its tenant's budgets (one round trip); 429 past any.

    A service key names its user in X-User-Id: the key's and the tenant's buckets hold however many
    users it names.
    """
    rt = runtime()
    settings = rt.settings
    blocked = g.pop("auth_failures", None)  # not checked yet (no key lookup): checked in this round trip
    buckets: list[tuple[str, int, str]] = []
    if settings.rate_limit_per_minute > 0:
        buckets.append((f"u:{who.tenant_id}:{who.user_id}", settings.rate_limit_per_minute,
                        "requests a minute for this user (STEPRUN_RATE_LIMIT_PER_MINUTE)"))
    key_id = g.get("key_id")
    if key_id and settings.rate_limit_per_key > 0:
        buckets.append((f"k:{key_id}", settings.rate_limit_per_key,
                        "requests a minute with this key (STEPRUN_RATE_LIMIT_PER_KEY)"))
    if settings.rate_limit_per_tenant > 0:
        buckets.append((f"t:{who.tenant_id}", settings.rate_limit_per_tenant,
                        "requests a minute for this tenant (STEPRUN_RATE_LIMIT_PER_TENANT)"))
    if not buckets:
        # The rate limits are off: the address check alone, which, like every check of failed
        # authentications, lets the request through when Redis is away (no limit makes Redis a dependency).
        if blocked is not None:
            retry_after = _fail_open(lambda: rt.limiter.peek(*blocked))
            if retry_after is not None:
                raise _too_many_failures(blocked[1], retry_after)
        return
    over = rt.limiter.hit_all([(name, limit) for name, limit, _ in buckets], watch=[blocked] if blocked else [])
    if over is not None and over[0] >= len(buckets):
        assert blocked is not None
        raise _too_many_failures(blocked[1], over[1])
    if over is not None:
        _, limit, what = buckets[over[0]]
        raise RateLimited(f"more than {limit} {what}; slow down", retry_after=over[1])


def authenticate(require_user: bool = True) -> Principal:
    header = request.headers.get("Authorization", "")
    if not header and request.path.startswith("/langgraph/") and request.headers.get("x-api-key"):
        header = "Bearer " + request.headers["x-api-key"]  # langgraph-sdk's header, taken like a bearer key
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("send 'Authorization: Bearer <key>'")
    if len(token) > 4096:
        raise Unauthorized("the bearer token is too long")
    settings = runtime().settings
    if jwt_enabled(settings) and looks_like_jwt(token):
        verified = verify_jwt(settings, token)
        g.credential = Credential("jwt", None, verified.expires_at)
        return verified.principal
    cache = runtime().key_cache
    identity = cache.get(token)
    if identity is None:
        refuse_blocked_address()  # an address past its failures costs no lookup
        with unit_of_work(runtime().sessions, SYSTEM) as keys:  # the system path: the app login cannot read keys
            identity = identify_key(keys, token)
        if identity is None:
            raise Unauthorized("the key is not valid (unknown or revoked)")
        cache.put(token, identity)
    g.key_id = identity.key_id
    if identity.admin:
        raise Unauthorized("an admin key signs in to /console; it does not call the API (use a user or service key)")
    g.credential = Credential("key", identity.key_id)
    if identity.user_id is not None:
        return Principal(identity.tenant_id, identity.user_id)
    g.service_key = True  # acts for the tenant: may also write tenant-wide data (knowledge)
    user_id = request.headers.get("X-User-Id", "")
    if not require_user:
        return Principal(identity.tenant_id, "")
    if not user_id:
        raise BadInput("a service key must name the user in the X-User-Id header", field="X-User-Id")
    if not USER_ID_RE.fullmatch(user_id):
        raise BadInput("X-User-Id must be 1-256 characters of letters, digits and . @ : + - _",
                       field="X-User-Id")
    return Principal(identity.tenant_id, user_id)
