"""Signed webhooks end to end: the official `openai` client manages the endpoints and verifies every delivery.

A receiver on loopback (a real HTTP server in this process) checks each
delivery with ``client.webhooks.unwrap``; the deployment (web, worker,
scheduler) runs on a database of its own with short retry waits
(STEPRUN_WEBHOOK_RETRY_BASE_SECONDS=0.5, capped at 2 s) and loopback URLs
allowed (STEPRUN_WEBHOOK_ALLOW_PRIVATE=true).
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest
from openai import OpenAI

from shared.auth.keys import create_key
from shared.db import make_engine, make_sessionmaker, unit_of_work
from shared.settings import Settings
from tests.support.processes import Procs, free_port
from tests.support.recovery_support import (
    Client,
    Deployment,
    deploy,
    drop_database,
    fresh_database,
    kill_group,
    own_settings,
)

ENV = {"STEPRUN_WEBHOOK_ALLOW_PRIVATE": "true", "STEPRUN_WEBHOOK_POLL_SECONDS": "0.2",
       "STEPRUN_WEBHOOK_RETRY_BASE_SECONDS": "0.5", "STEPRUN_WEBHOOK_RETRY_MAX_SECONDS": "2",
       "STEPRUN_WEBHOOK_TIMEOUT_SECONDS": "2", "STEPRUN_RATE_LIMIT_PER_MINUTE": "0", "STEPRUN_RATE_LIMIT_PER_KEY": "0"}


class Receiver:
    """A loopback webhook receiver that verifies each delivery with the official client; can go down and up."""

    def __init__(self, secret: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.secret = secret
        self.verifier = OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
        self.received: list[tuple[bytes, dict[str, str]]] = []
        self.verified: list[tuple[str, Any]] = []  # (webhook-id, event)
        self.rejected: list[str] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    event = receiver.verifier.webhooks.unwrap(body, headers, secret=receiver.secret)
                except Exception as exc:  # noqa: BLE001 - any failure is a rejected delivery
                    with receiver.lock:
                        receiver.rejected.append(repr(exc))
                    self.send_response(400)
                else:
                    with receiver.lock:
                        receiver.received.append((body, headers))
                        receiver.verified.append((headers["webhook-id"], event))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def events_for(self, turn_ids: set[str]) -> list[tuple[str, Any]]:
        with self.lock:
            return [(wid, e) for wid, e in self.verified if e.data.id in turn_ids]

    def wait_for(self, turn_ids: set[str], timeout: float) -> list[tuple[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.events_for(turn_ids)
            if {e.data.id for _, e in got} >= turn_ids or time.monotonic() > deadline:
                return got
            time.sleep(0.1)


@pytest.fixture(scope="module")
def dep(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    url = fresh_database()
    own = own_settings(settings, url)
    procs = Procs(own, tmp_path_factory.mktemp("webhooks"))
    try:
        yield deploy(procs, own, **ENV)
    finally:
        procs.stop_all()
        drop_database(url)


def _keys(dep: Deployment) -> tuple[str, str]:
    """A service key and a user key of one fresh tenant."""
    engine = make_engine(Settings(database_url=dep.settings.database_url))
    tenant = f"t-{secrets.token_hex(4)}"
    with unit_of_work(make_sessionmaker(engine)) as db:
        _, service = create_key(db, tenant, None, "service")
        _, user = create_key(db, tenant, f"u-{secrets.token_hex(3)}", "user")
    engine.dispose()
    return service, user


def _openai(dep: Deployment, key: str) -> OpenAI:
    return OpenAI(base_url=f"{dep.url}/v1", api_key=key, max_retries=0)


def _subscribe(dep: Deployment, receiver: Receiver, service: str) -> Any:
    endpoint = _openai(dep, service).webhooks.create(
        name="backend", url=receiver.url,
        event_types=["response.completed", "response.cancelled", "response.failed"])  # type: ignore[list-item]
    receiver.secret = endpoint.signing_secret
    return endpoint


def _finished_turns(c: Client, n: int, agent: str = "quick", text: str = "hi") -> list[str]:
    ids = [c.start(c.session(agent), text)["id"] for _ in range(n)]
    for turn_id in ids:
        assert c.wait_turn(turn_id, timeout=30)["status"] == "completed"
    return ids


def test_the_openai_client_manages_endpoints(dep: Deployment) -> None:
    service, user = _keys(dep)
    client = _openai(dep, service)
    receiver = Receiver()
    receiver.up()
    try:
        created = _subscribe(dep, receiver, service)
        assert created.object == "webhook_endpoint" and created.signing_secret.startswith("whsec_")
        assert created.signing_secret_hint and created.signing_secret not in created.signing_secret_hint
        assert [e.id for e in client.webhooks.list()] == [created.id]
        got = client.webhooks.retrieve(created.id)
        assert got.url == receiver.url and not hasattr(got, "signing_secret")
        updated = client.webhooks.update(created.id, name="renamed")
        assert updated.name == "renamed" and updated.event_types == created.event_types

        result = client.webhooks.test(created.id, event_type="response.completed")
        assert result.status_code == 200 and result.success
        rotated = client.webhooks.rotate_secret(created.id)
        assert rotated.signing_secret != created.signing_secret
        assert client.webhooks.test(created.id, event_type="response.completed").status_code == 400  # old secret
        receiver.secret = rotated.signing_secret
        assert client.webhooks.test(created.id, event_type="response.completed").status_code == 200
        kept = client.webhooks.rotate_secret(created.id, keep_old_secret_active_for_24_hours=True)
        assert client.webhooks.test(created.id, event_type="response.completed").status_code == 200  # old still ok
        receiver.secret = kept.signing_secret
        assert client.webhooks.test(created.id, event_type="response.completed").status_code == 200

        with pytest.raises(openai.PermissionDeniedError):
            _openai(dep, user).webhooks.list()
        other_service, _ = _keys(dep)
        with pytest.raises(openai.NotFoundError):
            _openai(dep, other_service).webhooks.retrieve(created.id)
        assert list(_openai(dep, other_service).webhooks.list()) == []
        with pytest.raises(openai.BadRequestError):
            client.webhooks.create(name="x", url="ftp://example.com/", event_types=["response.completed"])

        deleted = client.webhooks.delete(created.id)
        assert deleted.deleted and deleted.id == created.id
        assert list(client.webhooks.list()) == []
    finally:
        receiver.down()


def test_every_delivery_verifies_and_a_tampered_one_does_not(dep: Deployment) -> None:
    service, user = _keys(dep)
    receiver = Receiver()
    receiver.up()
    try:
        endpoint = _subscribe(dep, receiver, service)
        c = Client(dep.url, user)
        ids = set(_finished_turns(c, 3))
        got = receiver.wait_for(ids, timeout=15)
        assert sorted(e.data.id for _, e in got) == sorted(ids), got
        for webhook_id, event in got:
            assert event.type == "response.completed" and event.id == webhook_id and event.object == "event"
        assert receiver.rejected == []

        body, headers = receiver.received[0]
        verifier = receiver.verifier.webhooks
        tampered = body.replace(json.loads(body)["data"]["id"].encode(), b"turn_somebody_else")
        with pytest.raises(openai.InvalidWebhookSignatureError):
            verifier.unwrap(tampered, headers, secret=receiver.secret)
        with pytest.raises(openai.InvalidWebhookSignatureError):
            verifier.unwrap(body, headers, secret=_openai(dep, service).webhooks.rotate_secret(endpoint.id)
                            .signing_secret)
        verifier.unwrap(body, headers, secret=receiver.secret)  # the untouched one still verifies

        log = Client(dep.url, service).get(f"/v1/webhook_endpoints/{endpoint.id}/deliveries?status=delivered")
        assert log.status_code == 200 and len(log.json()["data"]) == 3, log.text
    finally:
        receiver.down()


def test_a_receiver_down_for_30_s_gets_every_event_once_when_it_returns(dep: Deployment) -> None:
    service, user = _keys(dep)
    receiver = Receiver()
    endpoint = _subscribe(dep, receiver, service)  # subscribed, but nothing listens yet
    c = Client(dep.url, user)
    down_since = time.monotonic()
    ids = set(_finished_turns(c, 5))
    log = Client(dep.url, service)
    time.sleep(max(0.0, 30 - (time.monotonic() - down_since)))
    pending = log.get(f"/v1/webhook_endpoints/{endpoint.id}/deliveries").json()["data"]
    assert len(pending) == 5 and all(d["status"] == "pending" and d["attempts"] >= 5 for d in pending), pending
    assert all("Connection" in (d["last_error"] or "") for d in pending), pending
    receiver.up()
    try:
        got = receiver.wait_for(ids, timeout=15)
        back = time.monotonic()
        time.sleep(3)  # room for any duplicate to arrive
        got = receiver.events_for(ids)
        by_turn: dict[str, set[str]] = {}
        for webhook_id, event in got:
            by_turn.setdefault(event.data.id, set()).add(webhook_id)
        print(f"\nall 5 events arrived {back - down_since - 30:.1f} s after the receiver came back")
        assert set(by_turn) == ids and all(len(v) == 1 for v in by_turn.values()), by_turn  # once by webhook-id
        assert len({wid for wid, _ in got}) == 5
        done = log.get(f"/v1/webhook_endpoints/{endpoint.id}/deliveries?status=delivered").json()["data"]
        assert len(done) == 5

        # A manual redeliver sends the same event again, under the same webhook-id.
        first = done[0]
        r = log.post(f"/v1/webhook_endpoints/{endpoint.id}/deliveries/{first['id']}/redeliver")
        assert r.status_code == 200 and r.json()["status"] == "pending", r.text
        deadline = time.monotonic() + 10
        while sum(1 for wid, _ in receiver.events_for(ids) if wid == first["event_id"]) < 2:
            assert time.monotonic() < deadline, "the redelivery did not arrive"
            time.sleep(0.1)
    finally:
        receiver.down()


def test_a_worker_killed_after_the_commit_loses_no_event_and_invents_none(dep: Deployment) -> None:
    service, user = _keys(dep)
    receiver = Receiver()
    receiver.up()
    try:
        _subscribe(dep, receiver, service)
        c = Client(dep.url, user)
        spare = dep.worker()
        victim = dep.workers[0]
        kill_group(spare)  # only the victim runs the first turns
        spare.popen.wait(timeout=10)
        ids = [c.start(c.session("paced"), "say 60")["id"] for _ in range(6)]
        # As soon as the first turn has committed its end, SIGKILL the worker running them all.
        deadline = time.monotonic() + 30
        while c.turn(ids[0])["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        kill_group(victim)
        dep.workers[:] = [dep.worker()]  # a new worker: the lease sweep hands it the rest
        for turn_id in ids:
            assert c.wait_turn(turn_id, timeout=60)["status"] == "completed"
        got = receiver.wait_for(set(ids), timeout=20)
        time.sleep(2)
        got = receiver.events_for(set(ids))
        by_turn: dict[str, set[str]] = {}
        for webhook_id, event in got:
            by_turn.setdefault(event.data.id, set()).add(webhook_id)
        assert set(by_turn) == set(ids), by_turn
        assert all(len(v) == 1 for v in by_turn.values()), by_turn  # one event per turn: none invented
        assert receiver.rejected == []
    finally:
        receiver.down()
