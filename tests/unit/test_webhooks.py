"""Webhooks against the real database: the outbox commits with the turn's change, fan-out, isolation, URLs."""
from __future__ import annotations

import json
import random
import secrets

import pytest
from sqlalchemy import select, text

from api.app import create_app
from shared.auth.keys import create_key
from shared.auth.principal import SYSTEM, Principal, Tenant
from shared.db import unit_of_work
from shared.engine.step import build_runtime, run_step
from shared.errors import BadInput
from shared.models import WebhookDelivery, WebhookEndpoint, WebhookEvent
from shared.runtime import Runtime
from shared.settings import Settings
from shared.turns import service as turns
from shared.webhooks import endpoints, urls
from shared.webhooks.delivery import fan_out, retry_delay


@pytest.fixture(scope="module")
def secure_rt(settings: Settings):  # noqa: ANN201
    rt = build_runtime(settings.replace(db_role="steprun_app", webhook_allow_private=True))
    yield rt
    rt.close()


def _endpoint(rt: Runtime, tenant: str, types: list[str]) -> str:
    with unit_of_work(rt.sessions, Tenant(tenant)) as db:
        return endpoints.create_endpoint(db, rt.settings, tenant, {
            "name": "n", "url": "http://127.0.0.1:9/hook", "event_types": types}).id


def _events(rt: Runtime, turn_id: str) -> list[WebhookEvent]:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        return list(db.scalars(select(WebhookEvent).where(WebhookEvent.turn_id == turn_id)))


def test_a_finished_turn_writes_one_outbox_event_with_its_commit(secure_rt: Runtime, who: Principal) -> None:
    rt = secure_rt
    with unit_of_work(rt.sessions, who) as db:
        sid = turns.create_session(db, rt, who, "math", None).id
        tid = turns.create_turn(db, rt, who, sid, "add 1 and 2")[0].id
    assert run_step(rt, tid, 0) == "in_progress"
    assert _events(rt, tid) == []  # a step that asks for another sends nothing
    assert run_step(rt, tid, 1) == "completed"
    assert run_step(rt, tid, 1) is not None  # a duplicate delivery of the task: fenced, invents nothing
    (event,) = _events(rt, tid)
    body = json.loads(event.body)
    assert body == {"id": event.id, "object": "event", "type": "response.completed",
                    "created_at": body["created_at"], "data": {"id": tid}}
    assert (event.tenant_id, event.user_id) == (who.tenant_id, who.user_id)


def test_a_rolled_back_change_writes_no_event(secure_rt: Runtime, who: Principal) -> None:
    rt = secure_rt
    with unit_of_work(rt.sessions, who) as db:
        sid = turns.create_session(db, rt, who, "math", None).id
        tid = turns.create_turn(db, rt, who, sid, "add 1 and 2")[0].id
    with pytest.raises(RuntimeError), unit_of_work(rt.sessions, who) as db:
        turns.cancel_turn(db, rt, who, tid)
        raise RuntimeError("the request failed after the change")
    assert _events(rt, tid) == []
    with unit_of_work(rt.sessions, who) as db:
        turns.cancel_turn(db, rt, who, tid)
    assert [e.type for e in _events(rt, tid)] == ["response.cancelled"]


def test_fan_out_reaches_the_subscribed_endpoints_of_the_tenant_only(secure_rt: Runtime) -> None:
    rt = secure_rt
    tenant, other = f"t-{secrets.token_hex(4)}", f"t-{secrets.token_hex(4)}"
    wants = _endpoint(rt, tenant, ["response.cancelled"])
    _endpoint(rt, tenant, ["response.completed"])  # not this type
    _endpoint(rt, other, ["response.cancelled"])  # not this tenant
    who = Principal(tenant, "u1")
    with unit_of_work(rt.sessions, who) as db:
        sid = turns.create_session(db, rt, who, "math", None).id
        tid = turns.create_turn(db, rt, who, sid, "add 1 and 2")[0].id
    with unit_of_work(rt.sessions, who) as db:
        turns.cancel_turn(db, rt, who, tid)
    (event,) = _events(rt, tid)
    for _ in range(20):  # other tests' events may be in the outbox too
        with unit_of_work(rt.sessions, SYSTEM) as db:
            if not fan_out(db, rt.settings):
                break
    assert _events(rt, tid) == []  # fanned out: the outbox row is gone
    with unit_of_work(rt.sessions, SYSTEM) as db:
        rows = list(db.scalars(select(WebhookDelivery).where(WebhookDelivery.event_id == event.id)))
    assert [(r.endpoint_id, r.status, r.body) for r in rows] == [(wants, "pending", event.body)]


def test_endpoints_and_deliveries_are_visible_to_their_tenant_only(secure_rt: Runtime) -> None:
    rt = secure_rt
    tenant = f"t-{secrets.token_hex(4)}"
    _endpoint(rt, tenant, ["response.completed"])
    for table in ("webhook_endpoints", "webhook_deliveries"):
        for scope in (Tenant("t-someone-else"), Principal(tenant, "a-user"), None):
            with unit_of_work(rt.sessions, scope) as db:  # no WHERE: the "bug"
                rows = db.execute(text(f"SELECT tenant_id FROM {table}")).scalars().all()
            assert all(t == getattr(scope, "tenant_id", None) for t in rows) and tenant not in rows, (table, scope)
    with unit_of_work(rt.sessions, Tenant(tenant)) as db:
        assert db.execute(text("SELECT tenant_id FROM webhook_endpoints")).scalars().all() == [tenant]
        assert not db.execute(text("SELECT 1 FROM webhook_events")).all()  # user data: no user, no rows


def test_retries_back_off_exponentially_with_jitter_for_at_least_a_day() -> None:
    s = Settings()
    rand = random.Random(7)
    waits = [retry_delay(s, n, rand) for n in range(1, 40)]
    for n, wait in enumerate(waits, start=1):
        nominal = min(5 * 2 ** (n - 1), 3600)
        assert 0.75 * nominal <= wait <= 1.25 * nominal
    assert len({round(w, 6) for w in waits}) == len(waits)  # jittered
    elapsed, attempts = 0.0, 1
    while elapsed < s.webhook_retry_window_seconds:
        elapsed += retry_delay(s, attempts, rand)
        attempts += 1
    assert 25 <= attempts <= 45, attempts  # about 30 attempts over the first day, then failed


@pytest.mark.parametrize("url", ["http://127.0.0.1/x", "http://localhost:6379/", "http://10.0.0.8/h",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1]/", "http://192.168.1.1/",
                                 "http://100.64.0.1/", "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/"])
def test_private_addresses_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(BadInput, match="private, loopback or link-local"):
        urls.check_url(url, allow_private=False)
    assert urls.check_url(url, allow_private=True) == url


@pytest.mark.parametrize("url", ["ftp://example.com/", "not a url", "http://user:pw@example.com/", "", 7,
                                 "http://" + "a" * 3000 + ".com/"])
def test_malformed_urls_are_refused(url: object) -> None:
    with pytest.raises(BadInput):
        urls.check_url(url, allow_private=True)


def test_endpoint_routes_take_a_service_key_and_refuse_private_urls(rt: Runtime) -> None:
    app = create_app(rt.settings, runtime=rt)
    tenant = f"t-{secrets.token_hex(4)}"
    with unit_of_work(rt.sessions, SYSTEM) as db:  # keys: the system path
        _, service = create_key(db, tenant, None, "svc")
        _, user = create_key(db, tenant, "alice", "user")
    client = app.test_client()
    body = {"name": "n", "url": "http://127.0.0.1:9/", "event_types": ["response.completed"]}
    r = client.post("/v1/webhook_endpoints", json=body, headers={"Authorization": f"Bearer {user}"})
    assert r.status_code == 403, r.text
    r = client.get("/v1/webhook_endpoints", headers={"Authorization": f"Bearer {user}"})
    assert r.status_code == 403, r.text
    r = client.post("/v1/webhook_endpoints", json=body, headers={"Authorization": f"Bearer {service}"})
    assert r.status_code == 400 and r.get_json()["error"]["field"] == "url", r.text
    r = client.post("/v1/webhook_endpoints", json={**body, "event_types": ["batch.completed"]},
                    headers={"Authorization": f"Bearer {service}"})
    assert r.status_code == 400 and r.get_json()["error"]["field"] == "event_types", r.text
    with unit_of_work(rt.sessions, Tenant(tenant)) as db:
        assert db.scalars(select(WebhookEndpoint)).all() == []
