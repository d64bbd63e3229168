"""The scheduler's side of webhooks: fan the outbox out to endpoints, send what is due, forget what is old.

Each step is safe with two schedulers at once: outbox rows and due deliveries
are taken with ``FOR UPDATE SKIP LOCKED``, and a delivery being sent is leased
by pushing its ``next_attempt_at`` past the attempt's timeout, in the claiming
transaction. A scheduler that dies mid-attempt leaves the lease to run out: the
delivery is sent again, with the same ``webhook-id`` (receivers dedupe on it).

Retries: after the n-th failed attempt the next one waits
``min(base * 2**(n-1), max)`` seconds, times a random factor in [0.75, 1.25];
an attempt that fails after ``retry_until`` (the event's time plus the retry
window, at least 24 h by default) marks the delivery ``failed``.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from shared.auth.principal import SYSTEM
from shared.clock import aware, utcnow
from shared.db import rowcount, unit_of_work
from shared.models import WebhookDelivery, WebhookEndpoint, WebhookEvent
from shared.runtime import Runtime
from shared.settings import Settings
from shared.webhooks import signing, urls
from shared.webhooks.endpoints import active_secrets

log = logging.getLogger(__name__)
BATCH = 200


@dataclass
class DeliveryReport:
    fanned_out: int = 0
    delivered: int = 0
    retrying: int = 0
    failed: int = 0

    def __bool__(self) -> bool:
        return bool(self.fanned_out or self.delivered or self.retrying or self.failed)

    def __str__(self) -> str:
        return (f"{self.fanned_out} events fanned out, {self.delivered} delivered, {self.retrying} to retry, "
                f"{self.failed} failed for good")


def retry_delay(settings: Settings, attempts: int, rand: random.Random | None = None) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: exponential, capped, with +-25% jitter."""
    base = min(settings.webhook_retry_base_seconds * 2 ** max(0, attempts - 1), settings.webhook_retry_max_seconds)
    return base * (0.75 + 0.5 * (rand or random).random())


def fan_out(db: Session, settings: Settings, limit: int = BATCH) -> int:
    """Turn outbox events into one delivery per subscribed endpoint, and delete them; returns events handled."""
    events = list(db.scalars(select(WebhookEvent).order_by(WebhookEvent.created_at).limit(limit)
                             .with_for_update(skip_locked=True)))
    if not events:
        return 0
    tenants = {e.tenant_id for e in events}
    endpoints: dict[str, list[WebhookEndpoint]] = {}
    for endpoint in db.scalars(select(WebhookEndpoint).where(WebhookEndpoint.tenant_id.in_(tenants))):
        endpoints.setdefault(endpoint.tenant_id, []).append(endpoint)
    window = timedelta(seconds=settings.webhook_retry_window_seconds)
    for event in events:
        created = aware(event.created_at)
        for endpoint in endpoints.get(event.tenant_id, []):
            # An endpoint gets the events of turns that changed after it existed, of the types it asked for.
            if event.type in endpoint.event_types and aware(endpoint.created_at) <= created:
                db.add(WebhookDelivery(tenant_id=event.tenant_id, endpoint_id=endpoint.id, event_id=event.id,
                                       event_type=event.type, body=event.body, status="pending",
                                       next_attempt_at=created, retry_until=created + window, created_at=created))
    db.flush()
    db.execute(delete(WebhookEvent).where(WebhookEvent.id.in_([e.id for e in events]))
               .execution_options(synchronize_session=False))
    return len(events)


@dataclass(frozen=True)
class _Attempt:
    delivery_id: str
    event_id: str
    body: str
    attempts: int
    retry_until: datetime
    url: str
    secrets: tuple[str, ...]


def _claim_due(rt: Runtime, limit: int) -> list[_Attempt]:
    now = utcnow()
    lease = now + timedelta(seconds=rt.settings.webhook_timeout_seconds + 30)
    due = (select(WebhookDelivery.id)
           .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
           .order_by(WebhookDelivery.next_attempt_at).limit(limit).with_for_update(skip_locked=True))
    with unit_of_work(rt.sessions, SYSTEM) as db:
        rows = db.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(due.scalar_subquery()), WebhookDelivery.status == "pending",
                   WebhookDelivery.next_attempt_at <= now)
            .values(next_attempt_at=lease, attempts=WebhookDelivery.attempts + 1, last_attempt_at=now)
            .returning(WebhookDelivery.id, WebhookDelivery.endpoint_id, WebhookDelivery.event_id,
                       WebhookDelivery.body, WebhookDelivery.attempts, WebhookDelivery.retry_until)
            .execution_options(synchronize_session=False)
        ).all()
        if not rows:
            return []
        endpoints = {e.id: e for e in db.scalars(select(WebhookEndpoint).where(
            WebhookEndpoint.id.in_({r.endpoint_id for r in rows})))}
        return [_Attempt(r.id, r.event_id, r.body, r.attempts, aware(r.retry_until), endpoints[r.endpoint_id].url,
                         tuple(active_secrets(endpoints[r.endpoint_id])))
                for r in rows if r.endpoint_id in endpoints]


def _send(settings: Settings, attempt: _Attempt) -> tuple[int | None, str | None]:
    timestamp = int(utcnow().timestamp())
    headers = signing.signed_headers(attempt.secrets, attempt.event_id, timestamp, attempt.body)
    try:
        status = urls.post(attempt.url, attempt.body, headers, settings.webhook_timeout_seconds,
                           settings.webhook_allow_private)
    except urls.DeliveryError as exc:
        return None, str(exc)
    return status, None if 200 <= status < 300 else f"the endpoint answered HTTP {status}"


def _deliver(rt: Runtime, attempt: _Attempt) -> str | None:
    """Send one attempt and record its result; returns the delivery's outcome, None if fenced out."""
    status, error = _send(rt.settings, attempt)
    now = utcnow()
    values: dict[str, Any] = {"last_status_code": status, "last_error": error}
    if error is None:
        outcome = "delivered"
        values.update(status="delivered", delivered_at=now)
    elif now >= attempt.retry_until:
        outcome = "failed"
        values.update(status="failed")
    else:
        outcome = "retrying"
        values.update(next_attempt_at=now + timedelta(seconds=retry_delay(rt.settings, attempt.attempts)))
    with unit_of_work(rt.sessions, SYSTEM) as db:
        # Fenced on the attempt number: a sender whose lease ran out (another took over) records nothing.
        done = rowcount(db.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == attempt.delivery_id, WebhookDelivery.attempts == attempt.attempts)
            .values(**values).execution_options(synchronize_session=False)))
    if not done:
        return None
    if outcome == "failed":
        log.warning("webhook %s: failed for good after %d attempts: %s", attempt.event_id, attempt.attempts, error)
    elif outcome == "retrying":
        log.info("webhook %s: attempt %d failed (%s); retrying", attempt.event_id, attempt.attempts, error)
    return outcome


def deliver_webhooks(rt: Runtime, limit: int = BATCH, max_rounds: int = 50) -> DeliveryReport:
    """One run: fan out the outbox, then send due deliveries, ``webhook_concurrency`` at a time.

    Each round claims no more than it sends at once, so every claimed delivery is
    being sent well within its lease; rounds go on while full ones come back.
    """
    report = DeliveryReport()
    with unit_of_work(rt.sessions, SYSTEM) as db:
        report.fanned_out = fan_out(db, rt.settings, limit)
    width = max(1, rt.settings.webhook_concurrency)
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="steprun-webhook") as pool:
        for _ in range(max_rounds):
            attempts: Sequence[_Attempt] = _claim_due(rt, width)
            for outcome in pool.map(lambda a: _deliver(rt, a), attempts):
                if outcome is not None:
                    setattr(report, outcome, getattr(report, outcome) + 1)
            if len(attempts) < width:
                break
    return report


def purge_deliveries(rt: Runtime) -> int:
    """Forget delivered and failed deliveries older than STEPRUN_WEBHOOK_RETENTION_SECONDS."""
    cutoff = utcnow() - timedelta(seconds=rt.settings.webhook_retention_seconds)
    with unit_of_work(rt.sessions, SYSTEM) as db:
        return rowcount(db.execute(
            delete(WebhookDelivery)
            .where(WebhookDelivery.status.in_(("delivered", "failed")), WebhookDelivery.created_at < cutoff)
            .execution_options(synchronize_session=False)))
