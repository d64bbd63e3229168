"""A tenant's webhook endpoints and their delivery log: the service functions behind /v1/webhook_endpoints.

The database session comes first and nothing commits here (the edge does).
Every query names the tenant; the tables' tenant-wide row-level security backs it up.
"""
from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.auth.principal import TenantAdmin
from shared.clock import aware, utcnow
from shared.errors import BadInput, Conflict, NotFound
from shared.models import WebhookDelivery, WebhookEndpoint
from shared.paging import page
from shared.settings import Settings
from shared.webhooks import signing, urls
from shared.webhooks.outbox import EVENT_TYPES, event_body

MAX_ENDPOINTS = 20
ROTATION_GRACE = timedelta(hours=24)
DELIVERY_STATUSES = ("pending", "delivered", "failed")


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise BadInput("'name' is required: a string of 1 to 200 characters", field="name")
    return value


def _event_types(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise BadInput(f"'event_types' must be a non-empty list of: {', '.join(EVENT_TYPES)}", field="event_types")
    unknown = [v for v in value if v not in EVENT_TYPES]
    if unknown:
        raise BadInput(f"unknown event type {unknown[0]!r}; steprun sends: {', '.join(EVENT_TYPES)}",
                       field="event_types")
    return list(dict.fromkeys(value))


def create_endpoint(db: Session, settings: Settings, tenant_id: str, body: dict[str, Any]) -> WebhookEndpoint:
    name, event_types = _name(body.get("name")), _event_types(body.get("event_types"))
    url = urls.check_url(body.get("url"), settings.webhook_allow_private)
    count = len(db.scalars(select(WebhookEndpoint.id).where(WebhookEndpoint.tenant_id == tenant_id)).all())
    if count >= MAX_ENDPOINTS:
        raise Conflict(f"a tenant may have at most {MAX_ENDPOINTS} webhook endpoints; delete one first")
    now = utcnow()
    row = WebhookEndpoint(tenant_id=tenant_id, name=name, url=url, event_types=event_types,
                          signing_secret=signing.new_secret(), created_at=now, updated_at=now)
    db.add(row)
    db.flush()
    return row


def get_endpoint(db: Session, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    row = db.scalars(select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id,
                                                   WebhookEndpoint.tenant_id == tenant_id)).first()
    if row is None:
        raise NotFound(f"no webhook endpoint {endpoint_id!r}")
    return row


def list_endpoints(db: Session, tenant_id: str, limit: int,
                   after: str | None) -> tuple[list[WebhookEndpoint], str | None]:
    query = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id)
    if after:
        anchor = db.scalars(query.where(WebhookEndpoint.id == after)).first()
        if anchor is None:
            raise BadInput(f"'after' {after!r} is not one of your webhook endpoints", field="after")
        query = query.where((WebhookEndpoint.created_at < anchor.created_at)
                            | ((WebhookEndpoint.created_at == anchor.created_at) & (WebhookEndpoint.id < anchor.id)))
    rows = db.scalars(query.order_by(WebhookEndpoint.created_at.desc(), WebhookEndpoint.id.desc()).limit(limit + 1))
    return page(rows, limit, lambda row: row.id)


def update_endpoint(db: Session, settings: Settings, tenant_id: str, endpoint_id: str,
                    body: dict[str, Any]) -> WebhookEndpoint:
    row = get_endpoint(db, tenant_id, endpoint_id)
    unknown = sorted(set(body) - {"name", "url", "event_types"})
    if unknown:
        raise BadInput(f"{unknown[0]!r} cannot be changed; send name, url or event_types", field=unknown[0])
    changed = False
    if "name" in body and body["name"] != row.name:
        row.name, changed = _name(body["name"]), True
    if "url" in body and body["url"] != row.url:
        row.url, changed = urls.check_url(body["url"], settings.webhook_allow_private), True
    if "event_types" in body:
        types = _event_types(body["event_types"])
        if types != list(row.event_types):
            row.event_types, changed = types, True
    if changed:  # OpenAI: unchanged updates do not advance updated_at
        row.updated_at = utcnow()
    return row


def delete_endpoint(db: Session, tenant_id: str, endpoint_id: str) -> None:
    """Delete the endpoint with its delivery log; pending deliveries to it are dropped."""
    db.delete(get_endpoint(db, tenant_id, endpoint_id))


def rotate_secret(db: Session, tenant_id: str, endpoint_id: str, keep_old: Any) -> WebhookEndpoint:
    if keep_old is not None and not isinstance(keep_old, bool):
        raise BadInput("'keep_old_secret_active_for_24_hours' must be true or false",
                       field="keep_old_secret_active_for_24_hours")
    row = get_endpoint(db, tenant_id, endpoint_id)
    now = utcnow()
    if keep_old:
        row.previous_secret, row.previous_secret_expires_at = row.signing_secret, now + ROTATION_GRACE
    else:
        row.previous_secret = row.previous_secret_expires_at = None
    row.signing_secret, row.updated_at = signing.new_secret(), now
    return row


def active_secrets(row: WebhookEndpoint) -> list[str]:
    """The secrets a delivery is signed with now: the current one, and a rotated-out one still honoured."""
    out = [row.signing_secret]
    if row.previous_secret and row.previous_secret_expires_at and aware(row.previous_secret_expires_at) > utcnow():
        out.append(row.previous_secret)
    return out


def send_test(db: Session, settings: Settings, tenant_id: str, endpoint_id: str,
              event_type: Any) -> dict[str, Any]:
    """Send one sample event now (not logged, not retried) and say what the endpoint answered."""
    if event_type not in EVENT_TYPES:
        raise BadInput(f"'event_type' must be one of: {', '.join(EVENT_TYPES)}", field="event_type")
    row = get_endpoint(db, tenant_id, endpoint_id)
    url, keys = row.url, active_secrets(row)
    db.rollback()  # hold no connection while the receiver answers
    event_id = "evt_test_" + secrets.token_hex(12)
    now = int(utcnow().timestamp())
    body = event_body(event_id, event_type, now, "turn_test_" + secrets.token_hex(6))
    result: dict[str, Any] = {"object": "webhook_endpoint.test", "webhook_endpoint_id": endpoint_id,
                              "event_type": event_type, "success": True}
    try:
        result["status_code"] = urls.post(url, body, signing.signed_headers(keys, event_id, now, body),
                                          settings.webhook_timeout_seconds, settings.webhook_allow_private)
    except urls.DeliveryError as exc:
        result.update(status_code=0, error=str(exc))
    return result


def list_deliveries(db: Session, tenant_id: str, endpoint_id: str, limit: int, after: str | None,
                    status: str | None) -> tuple[list[WebhookDelivery], str | None]:
    """The endpoint's delivery log, newest first."""
    get_endpoint(db, tenant_id, endpoint_id)
    if status is not None and status not in DELIVERY_STATUSES:
        raise BadInput(f"'status' must be one of: {', '.join(DELIVERY_STATUSES)}", field="status")
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id,
                                          WebhookDelivery.tenant_id == tenant_id)
    if status:
        query = query.where(WebhookDelivery.status == status)
    if after:
        anchor = db.scalars(query.where(WebhookDelivery.id == after)).first()
        if anchor is None:
            raise BadInput(f"'after' {after!r} is not a delivery of this endpoint", field="after")
        query = query.where((WebhookDelivery.created_at < anchor.created_at)
                            | ((WebhookDelivery.created_at == anchor.created_at)
                               & (WebhookDelivery.id < anchor.id)))
    rows = db.scalars(query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
                      .limit(limit + 1))
    return page(rows, limit, lambda row: row.id)


def redeliver(db: Session, settings: Settings, tenant_id: str, endpoint_id: str,
              delivery_id: str) -> WebhookDelivery:
    """Send a delivery again now, with the same webhook-id, and retry it for a new window if it fails."""
    get_endpoint(db, tenant_id, endpoint_id)
    row = db.scalars(select(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id, WebhookDelivery.endpoint_id == endpoint_id,
        WebhookDelivery.tenant_id == tenant_id).with_for_update()).first()
    if row is None:
        raise NotFound(f"no delivery {delivery_id!r} of webhook endpoint {endpoint_id!r}")
    now = utcnow()
    row.status, row.next_attempt_at = "pending", now
    row.retry_until = now + timedelta(seconds=settings.webhook_retry_window_seconds)
    return row


def tenant_endpoints(db: Session, admin: TenantAdmin) -> list[WebhookEndpoint]:
    """One tenant's endpoints, oldest first: the console's read (migration 0012's policy).

    Every query here names the tenant as well, so the embedded SQLite file (no row-level security) keeps to it.
    """
    return list(db.scalars(select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == admin.tenant_id)
                           .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id).limit(MAX_ENDPOINTS)))


def tenant_deliveries(db: Session, admin: TenantAdmin, status: str | None = None,
                      limit: int = 100) -> list[WebhookDelivery]:
    """One tenant's most recent deliveries, across its endpoints, newest first."""
    if status is not None and status not in DELIVERY_STATUSES:
        raise BadInput(f"'status' must be one of: {', '.join(DELIVERY_STATUSES)}", field="status")
    query = select(WebhookDelivery).where(WebhookDelivery.tenant_id == admin.tenant_id)
    if status:
        query = query.where(WebhookDelivery.status == status)
    return list(db.scalars(query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
                           .limit(limit)))
