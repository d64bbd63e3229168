"""The console's guarantees below the browser: the tenant-admin scope in the database, sign-in, cookies, CSRF.

Schedules and webhooks: the tenant admin reads its own (migration 0012) and no other tenant's.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, text
from sqlalchemy.exc import ProgrammingError

from api.app import create_app
from scheduler.jobs import sample_queue
from shared.auth.keys import create_key
from shared.auth.principal import SYSTEM, Principal, Tenant, TenantAdmin
from shared.clock import utcnow
from shared.db import unit_of_work
from shared.engine.step import build_runtime, run_step
from shared.fleet import WorkerBeat, latency, samples, workers
from shared.models import WebhookDelivery
from shared.runtime import Runtime
from shared.schedules import service as schedules
from shared.settings import Settings
from shared.turns import admin as tenant_view
from shared.turns import service as turns
from shared.webhooks import endpoints as webhooks
from shared.webhooks.delivery import fan_out
from tests.unit.test_isolation_db import USER_TABLES_SQL, _raw


def _turn(rt: Runtime, who: Principal, text_: str = "add 2 and 3") -> str:
    with unit_of_work(rt.sessions, who) as db:
        session = turns.create_session(db, rt, who, "math", {})
        turn, _ = turns.create_turn(db, rt, who, session.id, text_)
        turn_id = turn.id
    assert run_step(rt, turn_id, 0) == "in_progress"
    assert run_step(rt, turn_id, 1) == "completed"
    return turn_id


def test_a_tenant_admin_reads_every_user_of_its_tenant_and_nothing_else(rt: Runtime) -> None:
    tenant, other = f"t-{secrets.token_hex(4)}", f"t-{secrets.token_hex(4)}"
    alice, bob, eve = Principal(tenant, "alice"), Principal(tenant, "bob"), Principal(other, "eve")
    for who in (alice, bob, eve):
        _turn(rt, who)
    admin = TenantAdmin(tenant)
    tables = [r[0] for r in _raw(rt, SYSTEM, USER_TABLES_SQL) if r[0] != "api_keys"]
    for table in tables:
        # No WHERE clause: the database alone keeps the admin to its tenant.
        seen = _raw(rt, admin, f'SELECT tenant_id, user_id FROM "{table}"')  # type: ignore[arg-type]  # a scope
        assert all(t == tenant for t, _ in seen), table
        if table in ("sessions", "turns", "messages", "checkpoints", "trace_spans"):
            assert {u for _, u in seen} == {"alice", "bob"}, table
    with unit_of_work(rt.sessions, admin) as db:
        listed = tenant_view.list_turns(db, admin)
    assert {r.turn.user_id for r in listed} == {"alice", "bob"}


def test_a_tenant_admin_scope_writes_nothing(rt: Runtime) -> None:
    tenant = f"t-{secrets.token_hex(4)}"
    turn_id = _turn(rt, Principal(tenant, "alice"))
    with unit_of_work(rt.sessions, TenantAdmin(tenant)) as db:
        assert db.execute(text("UPDATE turns SET input = 'x' WHERE id = :id"), {"id": turn_id}).rowcount == 0
        assert db.execute(text("DELETE FROM messages WHERE turn_id = :id"), {"id": turn_id}).rowcount == 0
    with pytest.raises(ProgrammingError, match="row-level security"):
        with unit_of_work(rt.sessions, TenantAdmin(tenant)) as db:
            db.execute(text("INSERT INTO sessions (id, tenant_id, user_id, agent, metadata, turn_count, created_at, "
                            "updated_at) VALUES ('ses_admin', :t, 'alice', 'math', '{}', 0, now(), now())"),
                       {"t": tenant})


def test_fleet_figures_come_from_heartbeats_samples_and_turns(rt: Runtime) -> None:
    _turn(rt, Principal(f"t-{secrets.token_hex(4)}", "alice"))
    beat = WorkerBeat(rt)
    beat.beat()
    sample_queue(rt)
    with unit_of_work(rt.sessions, SYSTEM) as db:
        fleet = {w.worker_id: w for w in workers(db, rt)}
        assert fleet[rt.worker_id].alive and fleet[rt.worker_id].beat_age_seconds < 5
        since = utcnow() - timedelta(hours=1)
        assert samples(db, since)
        buckets, overall = latency(db, since, 60)
        assert overall.count >= 1 and overall.p99 >= overall.p50 >= 0 and buckets
    beat.stop()
    with unit_of_work(rt.sessions, SYSTEM) as db:
        assert rt.worker_id not in {w.worker_id for w in workers(db, rt)}


# --- over HTTP (Flask's test client) ------------------------------------------------

@pytest.fixture
def client(rt: Runtime) -> FlaskClient:
    return create_app(rt.settings, runtime=rt).test_client()


def _keys(rt: Runtime, tenant: str) -> tuple[str, str]:
    with unit_of_work(rt.sessions, SYSTEM) as db:  # keys: the system path
        _, admin = create_key(db, tenant, None, "ops", admin=True)
        _, user = create_key(db, tenant, "alice")
    return admin, user


def _form_token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def _sign_in(client: FlaskClient, key: str) -> tuple[int, str]:
    token = _form_token(client.get("/console").get_data(as_text=True))
    reply = client.post("/console/sign-in", data={"key": key, "csrf_token": token})
    return reply.status_code, reply.get_data(as_text=True)


def test_sign_in_sets_a_strict_httponly_cookie_and_refuses_other_keys(rt: Runtime, client: FlaskClient) -> None:
    admin, user = _keys(rt, f"t-{secrets.token_hex(4)}")
    page = client.get("/console")
    assert page.status_code == 200 and "Admin key" in page.get_data(as_text=True)
    for wrong in ("sr_not-a-key", user, ""):
        status, body = _sign_in(client, wrong)
        assert status == 401 and "That is not a live admin key." in body and "Turns" not in body
    token = _form_token(client.get("/console").get_data(as_text=True))
    reply = client.post("/console/sign-in", data={"key": admin, "csrf_token": token})
    assert reply.status_code == 303 and reply.headers["Location"].endswith("/console/turns")
    cookie = next(c for c in reply.headers.getlist("Set-Cookie") if c.startswith("steprun_console="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert admin not in cookie
    assert client.get("/console/turns").status_code == 200
    # The admin key is the console's; the API refuses it.
    api = client.get("/v1/agents", headers={"Authorization": f"Bearer {admin}"})
    assert api.status_code == 401 and "console" in api.get_json()["error"]["message"]


def test_forms_without_the_sessions_csrf_token_are_refused(rt: Runtime, client: FlaskClient) -> None:
    tenant = f"t-{secrets.token_hex(4)}"
    admin, _ = _keys(rt, tenant)
    # Sign-in itself: a token that is not this browser's cookie's.
    client.get("/console")
    forged = client.post("/console/sign-in", data={"key": admin, "csrf_token": secrets.token_urlsafe(32)})
    assert forged.status_code == 403
    assert _sign_in(client, admin)[0] == 303
    keys_page = client.get("/console/keys").get_data(as_text=True)
    token = _form_token(keys_page)
    for bad in ({}, {"csrf_token": "forged"}, {"csrf_token": token[:-2] + "xx"}):
        reply = client.post("/console/keys", data={"kind": "service", **bad})
        assert reply.status_code == 403, bad
    other_site = client.post("/console/keys", data={"kind": "service", "csrf_token": token},
                             headers={"Origin": "https://evil.example"})
    assert other_site.status_code == 403
    made = client.post("/console/keys", data={"kind": "service", "csrf_token": token})
    assert made.status_code == 201 and 'id="new-key"' in made.get_data(as_text=True)


def test_revoking_the_admin_key_ends_its_session(rt: Runtime, client: FlaskClient) -> None:
    admin, _ = _keys(rt, f"t-{secrets.token_hex(4)}")
    assert _sign_in(client, admin)[0] == 303
    with unit_of_work(rt.sessions, SYSTEM) as db:  # keys: the system path
        from shared.auth.keys import hash_key
        from shared.models import ApiKey

        row = db.query(ApiKey).filter(ApiKey.key_hash == hash_key(admin)).one()
        key_id = row.id
    token = _form_token(client.get("/console/keys").get_data(as_text=True))
    assert client.post(f"/console/keys/{key_id}/revoke", data={"csrf_token": token}).status_code == 303
    after = client.get("/console/turns")
    assert after.status_code == 303 and after.headers["Location"].endswith("/console")
    assert client.get("/console/turns.json").status_code == 401


def test_another_tenants_turn_and_key_are_not_found(rt: Runtime, client: FlaskClient) -> None:
    mine, theirs = f"t-{secrets.token_hex(4)}", f"t-{secrets.token_hex(4)}"
    admin, _ = _keys(rt, mine)
    _, their_user_key = _keys(rt, theirs)
    their_turn = _turn(rt, Principal(theirs, "eve"), "add 4 and 4 secret")
    assert _sign_in(client, admin)[0] == 303
    assert their_turn not in client.get("/console/turns").get_data(as_text=True)
    assert client.get(f"/console/turns/{their_turn}").status_code == 404
    with unit_of_work(rt.sessions, SYSTEM) as db:  # keys: the system path
        from shared.auth.keys import list_keys

        their_key_id = list_keys(db, theirs)[-1].id
    token = _form_token(client.get("/console/keys").get_data(as_text=True))
    assert client.post(f"/console/keys/{their_key_id}/revoke", data={"csrf_token": token}).status_code == 404
    ok = client.get("/v1/agents", headers={"Authorization": f"Bearer {their_user_key}"})
    assert ok.status_code == 200


# --- schedules and webhooks ---------------------------------------------------------------

@pytest.fixture(scope="module")
def hooks_rt(settings: Settings):  # noqa: ANN201
    """Loopback endpoint URLs are allowed here (the deliveries are never sent in these tests)."""
    runtime = build_runtime(settings.replace(webhook_allow_private=True))
    yield runtime
    runtime.close()


@dataclass
class TenantHooks:
    tenant: str
    schedule_id: str
    endpoint_id: str
    delivery_id: str
    secret: str


def _tenant_with_hooks(rt: Runtime, user: str) -> TenantHooks:
    """A tenant with one schedule and one endpoint that received one (failed) delivery of a cancelled turn."""
    tenant = f"t-{secrets.token_hex(4)}"
    who = Principal(tenant, user)
    with unit_of_work(rt.sessions, who) as db:
        schedule_id = schedules.create_schedule(db, rt, who, {
            "agent": "math", "input": f"nightly report for {tenant}", "every_seconds": 3600}).id
        sid = turns.create_session(db, rt, who, "math", None).id
        tid = turns.create_turn(db, rt, who, sid, "add 1 and 2")[0].id
    with unit_of_work(rt.sessions, Tenant(tenant)) as db:
        endpoint = webhooks.create_endpoint(db, rt.settings, tenant, {
            "name": f"hook {tenant}", "url": f"http://127.0.0.1:9/{tenant}", "event_types": ["response.cancelled"]})
        endpoint_id, secret = endpoint.id, endpoint.signing_secret
    with unit_of_work(rt.sessions, who) as db:
        turns.cancel_turn(db, rt, who, tid)
    for _ in range(50):  # other tests' events may be in the outbox too
        with unit_of_work(rt.sessions, SYSTEM) as db:
            if not fan_out(db, rt.settings):
                break
    with unit_of_work(rt.sessions, SYSTEM) as db:  # its retry window ran out, as after a day of refusals
        delivery = db.scalars(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)).one()
        delivery.status, delivery.attempts = "failed", 3
        delivery.last_status_code, delivery.last_error = 503, "the endpoint answered 503"
        delivery_id = delivery.id
    return TenantHooks(tenant, schedule_id, endpoint_id, delivery_id, secret)


def test_a_tenant_admin_reads_its_schedules_and_webhooks_and_no_other_tenants(hooks_rt: Runtime) -> None:
    rt = hooks_rt
    mine, theirs = _tenant_with_hooks(rt, "alice"), _tenant_with_hooks(rt, "eve")
    for hooks, other in ((mine, theirs), (theirs, mine)):
        admin = TenantAdmin(hooks.tenant)
        for table, own in (("schedules", hooks.schedule_id), ("webhook_endpoints", hooks.endpoint_id),
                           ("webhook_deliveries", hooks.delivery_id)):
            # No WHERE clause: the database alone keeps the admin to its tenant.
            seen = _raw(rt, admin, f'SELECT id, tenant_id FROM "{table}"')  # type: ignore[arg-type]  # a scope
            assert own in {i for i, _ in seen}, table
            assert all(t == hooks.tenant for _, t in seen), table
        with unit_of_work(rt.sessions, admin) as db:
            assert [s.id for s in schedules.tenant_schedules(db, admin)] == [hooks.schedule_id]
            assert [e.id for e in webhooks.tenant_endpoints(db, admin)] == [hooks.endpoint_id]
            assert [d.id for d in webhooks.tenant_deliveries(db, admin)] == [hooks.delivery_id]
            assert webhooks.tenant_deliveries(db, admin, "delivered") == []
            # Read-only: the admin scope changes nothing, even by id.
            for table, row_id in (("schedules", hooks.schedule_id), ("webhook_deliveries", hooks.delivery_id),
                                  ("webhook_endpoints", hooks.endpoint_id)):
                assert db.execute(text(f'UPDATE "{table}" SET tenant_id = tenant_id WHERE id = :id'),
                                  {"id": row_id}).rowcount == 0, table
            assert db.execute(text("UPDATE schedules SET paused = true WHERE id = :id"),
                              {"id": other.schedule_id}).rowcount == 0
    with unit_of_work(rt.sessions, SYSTEM) as db:
        assert db.get(WebhookDelivery, mine.delivery_id).status == "failed"  # type: ignore[union-attr]  # exists


def test_schedules_and_webhooks_pages_show_one_tenant_and_redeliver_with_csrf(hooks_rt: Runtime) -> None:
    rt = hooks_rt
    mine, theirs = _tenant_with_hooks(rt, "alice"), _tenant_with_hooks(rt, "eve")
    client = create_app(rt.settings, runtime=rt).test_client()
    admin, _ = _keys(rt, theirs.tenant)
    assert _sign_in(client, admin)[0] == 303
    nav = client.get("/console/turns").get_data(as_text=True)
    assert ">Schedules</a>" in nav and ">Webhooks</a>" in nav
    # Tenant B's admin: its own rows, none of tenant A's.
    schedules_page = client.get("/console/schedules").get_data(as_text=True)
    webhooks_page = client.get("/console/webhooks").get_data(as_text=True)
    assert theirs.schedule_id in schedules_page and mine.schedule_id not in schedules_page
    assert mine.tenant not in schedules_page + webhooks_page
    for own in (theirs.endpoint_id, theirs.delivery_id, "the endpoint answered 503", "response.cancelled"):
        assert own in webhooks_page, own
    assert mine.endpoint_id not in webhooks_page and mine.delivery_id not in webhooks_page
    assert theirs.secret not in webhooks_page  # the signing secret never reaches the page
    token = _form_token(webhooks_page)
    # Redelivering tenant A's delivery from tenant B's session: not found, and it stays failed.
    stolen = client.post(f"/console/webhooks/{mine.endpoint_id}/deliveries/{mine.delivery_id}/redeliver",
                         data={"csrf_token": token})
    assert stolen.status_code == 404
    path = f"/console/webhooks/{theirs.endpoint_id}/deliveries/{theirs.delivery_id}/redeliver"
    assert client.post(path, data={"csrf_token": "forged"}).status_code == 403
    with unit_of_work(rt.sessions, SYSTEM) as db:
        assert db.get(WebhookDelivery, mine.delivery_id).status == "failed"  # type: ignore[union-attr]  # exists
        assert db.get(WebhookDelivery, theirs.delivery_id).status == "failed"  # type: ignore[union-attr]  # exists
    done = client.post(path, data={"csrf_token": token})
    assert done.status_code == 303 and f"done={theirs.delivery_id}" in done.headers["Location"]
    with unit_of_work(rt.sessions, SYSTEM) as db:
        row = db.get(WebhookDelivery, theirs.delivery_id)
        assert row is not None and row.status == "pending" and row.retry_until > utcnow() + timedelta(hours=1)
    after = client.get(done.headers["Location"]).get_data(as_text=True)
    assert "queued to be sent again" in after
    assert "pending" in client.get("/console/webhooks?status=pending").get_data(as_text=True)
    assert client.get("/console/webhooks?status=bogus").status_code == 400
