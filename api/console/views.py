"""The console's pages (DESIGN section 12): Turns, Approvals, Queue, Keys, Agents, Schedules, Webhooks.

Reads run as the signed-in tenant's :class:`~shared.auth.principal.TenantAdmin`
(row-level security shows that tenant only); a change to a turn runs as the
turn's own user through :mod:`shared.turns.service`, the API's code path; the
queue and worker figures are the deployment's, as on /metrics.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, jsonify, make_response, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from api.console import charts
from api.console.session import (
    ConsoleSession,
    check_csrf,
    check_sign_in_csrf,
    current,
    sign_in,
    sign_in_token,
    sign_out,
)
from api.context import runtime
from api.serialize import ts
from shared.auth.keys import create_key, identify_key, list_keys
from shared.auth.principal import SYSTEM, Tenant
from shared.auth.stream_tokens import mint_stream_token
from shared.clock import aware, utcnow
from shared.db import unit_of_work
from shared.errors import BadInput, NotFound, RateLimited, StepRunError, Unauthorized
from shared.fleet import latency, retries, samples, workers
from shared.models import ApiKey, TurnStatus
from shared.schedules import service as schedules
from shared.stats import queue_stats
from shared.turns import admin as tenant_view
from shared.turns import service as turns
from shared.webhooks import endpoints as webhooks

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates", static_folder="static")

# The navigation, in order: (endpoint, label).
NAV = (
    ("console.turns_page", "Turns"),
    ("console.approvals_page", "Approvals"),
    ("console.queue_page", "Queue"),
    ("console.keys_page", "Keys"),
    ("console.agents_page", "Agents"),
    ("console.schedules_page", "Schedules"),
    ("console.webhooks_page", "Webhooks"),
)
SIGN_IN_PER_MINUTE = 20
LAST_HOUR = timedelta(hours=1)
LATENCY_BUCKET_SECONDS = 60
PUBLIC = {"console.sign_in_page", "console.sign_in_post", "console.static"}


@bp.context_processor
def _context() -> dict[str, Any]:
    return {"session": current(), "nav": NAV}


@bp.before_request
def _guard() -> BaseResponse | None:
    """Every page but sign-in needs a session; every POST its CSRF token."""
    if request.endpoint in PUBLIC:
        return None
    session = current()
    if session is None:
        if request.method == "GET" and not request.path.endswith(".json"):
            return redirect(url_for("console.sign_in_page"), code=303)
        raise Unauthorized("sign in to the console first")
    if request.method == "POST":
        check_csrf(session)
    return None


@bp.after_request
def _headers(response: Response) -> Response:
    # Scripts and styles come from /console/static only: an injected <script> does not run.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "console.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.errorhandler(StepRunError)
def _error(exc: StepRunError) -> BaseResponse:
    if request.path.endswith(".json") or request.headers.get("Accept") == "application/json":
        body = jsonify({"error": {"code": exc.code, "message": exc.message}})
        body.status_code = exc.status
        return body
    return make_response(render_template("console/error.html", message=exc.message, status=exc.status),
                         exc.status)


def _page(template: str, **context: Any) -> str:
    return render_template(f"console/{template}", **context)


def _session() -> ConsoleSession:
    session = current()
    if session is None:  # _guard let only signed-in requests through
        raise Unauthorized("sign in to the console first")
    return session


# --- sign-in ------------------------------------------------------------------

@bp.get("/")
@bp.get("")  # registered first: url_for gives /console
def sign_in_page() -> BaseResponse:
    if current() is not None:
        return redirect(url_for("console.turns_page"), code=303)
    response = make_response()
    token = sign_in_token(response)
    response.set_data(_page("sign_in.html", csrf=token, error=None))
    return response


@bp.post("/sign-in")
def sign_in_post() -> BaseResponse:
    check_sign_in_csrf()
    rt = runtime()
    retry = rt.limiter.hit(f"console-sign-in:{request.remote_addr}", SIGN_IN_PER_MINUTE)
    if retry is not None:
        raise RateLimited(f"more than {SIGN_IN_PER_MINUTE} sign-in attempts a minute; wait and try again",
                          retry_after=retry)
    raw = request.form.get("key", "").strip()
    identity = None
    if raw and len(raw) <= 4096:
        with unit_of_work(rt.sessions, SYSTEM) as db:  # keys: the system path
            identity = identify_key(db, raw)
    if identity is None or not identity.admin:
        response = make_response()
        token = sign_in_token(response)
        response.set_data(_page("sign_in.html", csrf=token, error="That is not a live admin key."))
        response.status_code = 401
        return response
    done = redirect(url_for("console.turns_page"), code=303)
    sign_in(done, identity.key_id, identity.tenant_id)
    return done


@bp.post("/sign-out")
def sign_out_post() -> BaseResponse:
    response = redirect(url_for("console.sign_in_page"), code=303)
    sign_out(response)
    return response


# --- turns ----------------------------------------------------------------------

def _filters() -> dict[str, Any]:
    status = request.args.get("status") or None
    if status is not None and status not in tenant_view.STATUS_GROUPS:
        raise BadInput(f"status must be one of {', '.join(tenant_view.STATUS_GROUPS)}", field="status")
    return {"status": status, "agent": request.args.get("agent") or None, "user": request.args.get("user") or None}


def _row_json(row: tenant_view.TurnRow) -> dict[str, Any]:
    turn = row.turn
    return {
        "id": turn.id, "input": turn.input[:80], "user": turn.user_id, "agent": row.agent, "status": turn.status,
        "step": turn.step_count, "attempts": turn.attempt,  # claims of its steps, retries included
        "created_at": ts(turn.created_at),
        "age_seconds": round((utcnow() - aware(turn.created_at)).total_seconds(), 1),
        "url": url_for("console.turn_page", turn_id=turn.id),
    }


def _turn_rows() -> list[dict[str, Any]]:
    session = _session()
    with unit_of_work(runtime().sessions, session.admin) as db:
        return [_row_json(r) for r in tenant_view.list_turns(db, session.admin, **_filters())]


@bp.get("/turns")
def turns_page() -> str:
    return _page("turns.html", rows=_turn_rows(), filters=_filters(), groups=list(tenant_view.STATUS_GROUPS),
                 agents=[a.name for a in runtime().agents])


@bp.get("/turns.json")
def turns_json() -> Response:
    return jsonify({"data": _turn_rows()})


def _turn_context(turn_id: str) -> dict[str, Any]:
    session = _session()
    with unit_of_work(runtime().sessions, session.admin) as db:
        row = tenant_view.get_turn(db, session.admin, turn_id)
        messages = tenant_view.turn_messages(db, session.admin, row.turn)
        spans = tenant_view.turn_spans(db, session.admin, turn_id)
    return {"row": row, "turn": row.turn, "messages": messages, "trace": charts.waterfall(spans),
            "spans": spans, "finished": row.turn.status not in (TurnStatus.QUEUED, TurnStatus.IN_PROGRESS)}


@bp.get("/turns/<turn_id>")
def turn_page(turn_id: str) -> str:
    return _page("turn.html", **_turn_context(turn_id))


@bp.get("/turns/<turn_id>/trace")
def turn_trace(turn_id: str) -> str:
    """The trace and history panels alone: the turn page swaps them in as steps commit."""
    return render_template("console/_turn_panels.html", **_turn_context(turn_id))


@bp.post("/turns/<turn_id>/stream-token")
def turn_stream_token(turn_id: str) -> Response:
    """A stream token for the turn's session, minted for its user: the page follows the API's SSE route."""
    session, rt = _session(), runtime()
    with unit_of_work(rt.sessions, session.admin) as db:
        row = tenant_view.get_turn(db, session.admin, turn_id)
    secret = rt.settings.secret_key or ""
    # Read-only, and carrying the admin key's id: revoking that key ends the page's stream too.
    token, _ = mint_stream_token(secret, row.principal, row.turn.session_id, rt.settings.stream_token_ttl,
                                 key_id=session.key_id)
    return jsonify({"token": token, "session_id": row.turn.session_id,
                    "url": f"/v1/sessions/{row.turn.session_id}/events/stream"})


@bp.post("/turns/<turn_id>/resume")
def resume(turn_id: str) -> BaseResponse:
    """Approve, decline or answer a paused turn: shared.turns.service.resume_turn, as the API's resume."""
    session, rt = _session(), runtime()
    action = request.form.get("action", "")
    if action == "approve":
        body: dict[str, Any] = {"approve": True}
    elif action == "decline":
        body = {"approve": False}
    elif action == "answer":
        body = {"input": request.form.get("input", "")}
    else:
        raise BadInput("action must be approve, decline or answer", field="action")
    with unit_of_work(rt.sessions, session.admin) as db:
        who = tenant_view.get_turn(db, session.admin, turn_id).principal
    with unit_of_work(rt.sessions, who) as db:
        turns.resume_turn(db, rt, who, turn_id, body)
    target = request.form.get("next", "")
    if target != "turn":
        return redirect(url_for("console.approvals_page", done=turn_id), code=303)
    return redirect(url_for("console.turn_page", turn_id=turn_id), code=303)


# --- approvals -------------------------------------------------------------------

@bp.get("/approvals")
def approvals_page() -> str:
    session = _session()
    with unit_of_work(runtime().sessions, session.admin) as db:
        rows = tenant_view.waiting_turns(db, session.admin)
    return _page("approvals.html", rows=rows, done=request.args.get("done"))


# --- queue and workers --------------------------------------------------------------

@bp.get("/queue")
def queue_page() -> str:
    rt = runtime()
    now = utcnow()
    since = now - LAST_HOUR
    with unit_of_work(rt.sessions, SYSTEM) as db:  # the shared fleet, as /metrics shows it
        stats = queue_stats(db)
        history = samples(db, since)
        buckets, overall = latency(db, since, LATENCY_BUCKET_SECONDS)
        fleet = workers(db, rt)
        retried = retries(db, since)
    return _page("queue.html", stats=stats, overall=overall, workers=fleet, retried=retried,
                 lease_expiries=sum(s.lease_expiries for s in history),
                 depth=charts.depth_chart(history, since, now),
                 latency=charts.latency_chart(buckets, since, now, LATENCY_BUCKET_SECONDS),
                 beat_seconds=rt.settings.worker_beat_seconds, sample_seconds=rt.settings.queue_sample_seconds)


# --- keys ----------------------------------------------------------------------------

@bp.get("/keys")
def keys_page() -> str:
    return _keys_page(None)


def _keys_page(new_key: str | None, status: int = 200) -> Any:
    session = _session()
    with unit_of_work(runtime().sessions, SYSTEM) as db:  # keys: the system path
        rows = list_keys(db, session.tenant_id)
    return _page("keys.html", keys=rows, new_key=new_key, me=session.key_id), status


@bp.post("/keys")
def create_key_post() -> Any:
    session = _session()
    kind, user, name = request.form.get("kind", ""), request.form.get("user", "").strip(), request.form.get("name")
    if kind not in ("user", "service", "admin"):
        raise BadInput("kind must be user, service or admin", field="kind")
    if kind == "user" and not user:
        raise BadInput("a user key needs the user's id", field="user")
    with unit_of_work(runtime().sessions, SYSTEM) as db:  # keys: the system path
        _, raw = create_key(db, session.tenant_id, user if kind == "user" else None, (name or "").strip()[:200] or None,
                            admin=kind == "admin")
    return _keys_page(raw, 201)


@bp.post("/keys/<key_id>/revoke")
def revoke_key_post(key_id: str) -> BaseResponse:
    session, rt = _session(), runtime()
    with unit_of_work(rt.sessions, SYSTEM) as db:  # keys: the system path
        row = db.get(ApiKey, key_id)
        if row is None or row.tenant_id != session.tenant_id:
            raise NotFound(f"no key {key_id!r} in this tenant")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        digest = row.key_hash
    rt.key_cache.forget(digest)  # this process refuses it now; others within STEPRUN_KEY_CACHE_SECONDS
    rt.live_keys.forget(key_id)  # and the stream tokens it minted, and this process's sockets at their recheck
    return redirect(url_for("console.keys_page"), code=303)


# --- agents ----------------------------------------------------------------------------

@bp.get("/agents")
def agents_page() -> str:
    return _page("agents.html", agents=[a.describe() for a in runtime().agents])



# --- schedules ---------------------------------------------------------------------------

@bp.get("/schedules")
def schedules_page() -> str:
    session = _session()
    with unit_of_work(runtime().sessions, session.admin) as db:
        rows = schedules.tenant_schedules(db, session.admin)
    return _page("schedules.html", rows=rows)


# --- webhooks ----------------------------------------------------------------------------

@bp.get("/webhooks")
def webhooks_page() -> str:
    """Endpoints (never their secrets) and the recent deliveries, filterable by status."""
    session = _session()
    status = request.args.get("status") or None
    with unit_of_work(runtime().sessions, session.admin) as db:
        endpoints = webhooks.tenant_endpoints(db, session.admin)
        deliveries = webhooks.tenant_deliveries(db, session.admin, status)
    names = {e.id: e.name for e in endpoints}
    return _page("webhooks.html", endpoints=endpoints, deliveries=deliveries, names=names, status=status,
                 statuses=webhooks.DELIVERY_STATUSES, done=request.args.get("done"))


@bp.post("/webhooks/<endpoint_id>/deliveries/<delivery_id>/redeliver")
def redeliver_post(endpoint_id: str, delivery_id: str) -> BaseResponse:
    """Send a delivery again: shared.webhooks.endpoints.redeliver, as the API's redeliver, tenant-wide."""
    session, rt = _session(), runtime()
    with unit_of_work(rt.sessions, Tenant(session.tenant_id)) as db:
        webhooks.redeliver(db, rt.settings, session.tenant_id, endpoint_id, delivery_id)
    return redirect(url_for("console.webhooks_page", done=delivery_id), code=303)
