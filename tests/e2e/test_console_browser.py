"""The console in a real browser: headless Chromium (Debian's package) driven by Playwright.

The deployment is the Procfile's (gunicorn web, Celery worker, scheduler on
Postgres and Redis). Turns are started over the API, as an application would;
the operator watches, approves and revokes in the browser. Every page is
screenshotted into the test's artifact folder (printed at the end); with
STEPRUN_UPDATE_DOCS_SCREENSHOTS=1 the turns and trace shots also replace
docs/console-turns.png and docs/console-trace.png, the README's.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support.processes import BIN, ROOT, Procs, create_key_cli, settings_env

CHROMIUM = "/usr/bin/chromium"  # Debian: apt-get install -y chromium chromium-driver
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


@dataclass
class Console:
    url: str
    admin_key: str  # tenant A's admin
    user_key: str  # tenant A's user "alice", for the API
    other_admin_key: str  # tenant B's admin
    shots: Path
    env: dict[str, str]
    tenant: str

    def api(self, method: str, path: str, key: str | None = None, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {key or self.user_key}"}
        return requests.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kw)

    def start_turn(self, agent: str, text: str) -> dict[str, Any]:
        session = self.api("POST", "/v1/sessions", json={"agent": agent})
        assert session.status_code == 201, session.text
        turn = self.api("POST", f"/v1/sessions/{session.json()['id']}/turns", json={"input": text})
        assert turn.status_code in (201, 202), turn.text
        return turn.json()

    def wait_status(self, turn_id: str, statuses: set[str], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = self.api("GET", f"/v1/turns/{turn_id}?wait=5").json()
            if body.get("status") in statuses:
                return body
        raise AssertionError(f"turn {turn_id} is {body.get('status')}, not one of {statuses}")


def admin_key_cli(env: dict[str, str], tenant: str) -> str:
    out = subprocess.run([str(BIN / "steprun"), "keys", "create", "--tenant", tenant, "--admin", "--name", "ops"],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def console(settings: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    env = settings_env(settings)
    env.update(STEPRUN_AGENTS="tests.support.agents_console", STEPRUN_KEY_CACHE_SECONDS="0.5",
               STEPRUN_QUEUE_SAMPLE_SECONDS="1", STEPRUN_WORKER_BEAT_SECONDS="1",
               STEPRUN_WEBHOOK_ALLOW_PRIVATE="1", STEPRUN_WEBHOOK_POLL_SECONDS="0.5")
    procs = Procs(settings, tmp_path_factory.mktemp("console-logs"))
    try:
        procs.worker(env=env)
        procs.scheduler(env=env)
        _, url = procs.web(env=env)
        tenant, other = f"t-{secrets.token_hex(4)}", f"t-{secrets.token_hex(4)}"
        shots = tmp_path_factory.mktemp("console-screenshots")
        yield Console(url, admin_key_cli(env, tenant), create_key_cli(env, tenant, "alice"),
                      admin_key_cli(env, other), shots, env, tenant)
        print(f"\nconsole screenshots: {shots}")
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def new_page(browser: Browser, viewport: dict[str, int] = DESKTOP) -> Page:
    context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]  # a ViewportSize dict
    context.set_default_timeout(15_000)
    return context.new_page()


def sign_in(page: Page, console: Console, key: str) -> None:
    page.goto(f"{console.url}/console")
    page.get_by_label("Admin key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("navigation").get_by_role("link", name="Turns")).to_be_visible()


def shot(page: Page, console: Console, name: str, docs: str | None = None) -> None:
    path = console.shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if docs and os.environ.get("STEPRUN_UPDATE_DOCS_SCREENSHOTS") == "1":
        shutil.copyfile(path, ROOT / "docs" / docs)


def test_sign_in_then_watch_a_turn_live_and_open_its_trace(browser: Browser, console: Console) -> None:
    page = new_page(browser)
    page.goto(f"{console.url}/console")
    shot(page, console, "sign-in")
    sign_in(page, console, console.admin_key)
    for label in ("Turns", "Approvals", "Queue", "Keys", "Agents"):
        expect(page.get_by_role("navigation").get_by_role("link", name=label)).to_be_visible()
    page.evaluate("window.__noReload = true")  # gone if the page reloads: the table must update by itself

    traced = console.start_turn("math", "add 19 and 23")
    console.wait_status(traced["id"], {"completed"})
    live_text = f"say hello to the console {secrets.token_hex(3)}"
    live = console.start_turn("echo", live_text)
    row = page.get_by_role("row").filter(has_text=live_text)
    expect(row).to_be_visible()  # appeared without a reload
    expect(row.get_by_text("in_progress")).to_be_visible(timeout=10_000)  # seen running
    expect(row.get_by_text("completed")).to_be_visible(timeout=30_000)  # and then completed
    assert page.evaluate("window.__noReload") is True
    assert console.wait_status(live["id"], {"completed"})["status"] == "completed"
    expect(page.get_by_role("row").filter(has_text="add 19 and 23").get_by_text("completed")).to_be_visible()
    shot(page, console, "turns", docs="console-turns.png")

    page.get_by_role("link", name="add 19 and 23").click()
    trace = page.locator('svg[aria-label="trace"]')
    expect(trace).to_be_visible()
    # Two steps, two model calls and the add tool call: five bars.
    expect(trace.locator("rect")).to_have_count(5)
    expect(trace.get_by_text("tool add", exact=True)).to_be_visible()
    expect(page.locator("#events").get_by_text("turn.completed")).to_be_visible()
    expect(page.locator("#turn-status")).to_have_text("completed")
    expect(page.locator(".output")).to_have_text("The result of add is 42.")
    shot(page, console, "trace", docs="console-trace.png")

    # A turn's page follows it live too: open it while it runs, watch it finish there.
    running = console.start_turn("echo", "follow me on my page")
    page.goto(f"{console.url}/console/turns/{running['id']}")
    expect(page.locator("#turn-status")).to_have_text("completed", timeout=30_000)
    expect(page.locator("#events").get_by_text("message", exact=True).first).to_be_visible()
    expect(page.locator('svg[aria-label="trace"]')).to_be_visible()


def test_approve_a_pending_tool_call_by_clicking(browser: Browser, console: Console) -> None:
    turn = console.start_turn("bank", "transfer to bob 25")
    console.wait_status(turn["id"], {"requires_action"})
    page = new_page(browser)
    sign_in(page, console, console.admin_key)
    page.get_by_role("navigation").get_by_role("link", name="Approvals").click()
    card = page.locator(f'.approval[data-turn-id="{turn["id"]}"]')
    expect(card.get_by_text("transfer", exact=True)).to_be_visible()
    expect(card.locator("pre.args")).to_contain_text('"amount": 25')
    expect(card.locator("pre.args")).to_contain_text("bob")
    shot(page, console, "approvals")
    card.get_by_role("button", name="Approve").click()
    expect(page.get_by_role("status")).to_contain_text(turn["id"])
    done = console.wait_status(turn["id"], {"completed", "failed"})
    assert done["status"] == "completed" and "sent 25.00 to" in done["output"], done
    expect(page.locator(f'.approval[data-turn-id="{turn["id"]}"]')).to_have_count(0)
    page.goto(f"{console.url}/console/turns/{turn['id']}")
    expect(page.locator("#turn-status")).to_have_text("completed")

    # Decline goes through the same path: the tool never runs.
    declined = console.start_turn("bank", "transfer to mallory 99")
    console.wait_status(declined["id"], {"requires_action"})
    page.goto(f"{console.url}/console/approvals")
    page.locator(f'.approval[data-turn-id="{declined["id"]}"]').get_by_role("button", name="Decline").click()
    after = console.wait_status(declined["id"], {"completed", "failed"})
    assert "sent 99.00" not in after["output"]


def test_revoke_a_key_and_the_api_refuses_it(browser: Browser, console: Console) -> None:
    env_key = create_key_cli(console.env, console.tenant, "dave")
    assert console.api("GET", "/v1/sessions", key=env_key).status_code == 200
    page = new_page(browser)
    sign_in(page, console, console.admin_key)
    page.get_by_role("navigation").get_by_role("link", name="Keys").click()
    row = page.get_by_role("row").filter(has_text=env_key[:10])
    expect(row.get_by_text("dave")).to_be_visible()
    shot(page, console, "keys")
    row.get_by_role("button", name="Revoke").click()
    expect(page.get_by_role("row").filter(has_text=env_key[:10]).get_by_text(re.compile("^revoked"))).to_be_visible()
    deadline = time.monotonic() + 10  # the web process's key cache: 0.5 s in this deployment
    while console.api("GET", "/v1/sessions", key=env_key).status_code != 401:
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.2)
    refused = console.api("GET", "/v1/sessions", key=env_key)
    assert "revoked" in refused.json()["error"]["message"]


def test_a_second_tenants_admin_sees_none_of_the_first_tenants_turns(browser: Browser, console: Console) -> None:
    secret = f"tenant A private {secrets.token_hex(3)}"
    mine = console.start_turn("math", secret + " add 1 and 1")
    console.wait_status(mine["id"], {"completed"})
    page = new_page(browser)
    sign_in(page, console, console.other_admin_key)
    expect(page.get_by_text("No turns yet.")).to_be_visible()
    expect(page.get_by_text("add 19 and 23")).to_have_count(0)
    expect(page.get_by_text(secret)).to_have_count(0)
    page.get_by_role("navigation").get_by_role("link", name="Approvals").click()
    expect(page.get_by_text("Nothing waits for an approval or an answer.")).to_be_visible()
    page.get_by_role("navigation").get_by_role("link", name="Keys").click()
    expect(page.get_by_text("alice")).to_have_count(0)
    # Tenant A's turn, asked for by id: not found.
    for path in (f"/console/turns/{mine['id']}", f"/console/turns/{mine['id']}/trace"):
        reply = page.goto(f"{console.url}{path}")
        assert reply is not None and reply.status == 404, path
    shot(page, console, "other-tenant-404")
    grab = page.request.post(f"{console.url}/console/turns/{mine['id']}/stream-token",
                             headers={"X-CSRF-Token": page.locator('meta[name="csrf-token"]').get_attribute("content")
                                      or ""})
    assert grab.status == 404


def test_a_bad_admin_key_and_a_forged_csrf_token_are_refused(browser: Browser, console: Console) -> None:
    page = new_page(browser)
    page.goto(f"{console.url}/console")
    page.get_by_label("Admin key").fill("sr_this-is-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That is not a live admin key.")
    expect(page.get_by_role("navigation")).to_have_count(0)
    shot(page, console, "bad-key")
    # A user key is not an admin key either.
    page.get_by_label("Admin key").fill(create_key_cli(console.env, console.tenant, "bob"))
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That is not a live admin key.")

    sign_in(page, console, console.admin_key)
    page.get_by_role("navigation").get_by_role("link", name="Keys").click()
    before = page.get_by_role("row").count()
    page.evaluate("document.querySelector('form.create-key input[name=csrf_token]').value = 'forged'")
    page.locator("form.create-key").get_by_role("button", name="Create").click()
    expect(page.get_by_role("alert")).to_contain_text("CSRF token")
    shot(page, console, "csrf-refused")
    page.goto(f"{console.url}/console/keys")
    assert page.get_by_role("row").count() == before  # nothing was created


def test_queue_agents_and_phone_width(browser: Browser, console: Console) -> None:
    page = new_page(browser)
    sign_in(page, console, console.admin_key)
    page.get_by_role("navigation").get_by_role("link", name="Queue").click()
    expect(page.locator("#workers tr.alive")).to_have_count(1, timeout=10_000)
    expect(page.locator('svg[aria-label="queue depth"] polyline.waiting')).to_have_count(1)
    expect(page.locator('svg[aria-label="queue latency"] circle.p99').first).to_be_attached()
    metrics = requests.get(f"{console.url}/metrics", timeout=10).text
    for name in ("steprun_queue_waiting_steps", "steprun_queue_running_steps", "steprun_queue_expired_leases"):
        value = re.search(rf"^{name} (\S+)$", metrics, re.M)
        assert value, name
        expect(page.locator(f'[data-metric="{name}"]')).to_have_text(str(int(float(value.group(1)))))
    shot(page, console, "queue")

    page.get_by_role("navigation").get_by_role("link", name="Agents").click()
    expect(page.get_by_text("needs approval")).to_be_visible()
    page.get_by_text("transfer", exact=True).click()
    expect(page.locator("details[open] pre.args")).to_contain_text('"amount"')
    shot(page, console, "agents")

    phone = new_page(browser, PHONE)
    sign_in(phone, console, console.admin_key)
    for path in ("/console/turns", "/console/approvals", "/console/queue", "/console/keys", "/console/agents"):
        phone.goto(f"{console.url}{path}")
        # Wide tables scroll inside their own box; the page itself never scrolls sideways.
        width = phone.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"] + 1, (path, width)
        expect(phone.get_by_role("navigation").get_by_role("link", name="Agents")).to_be_in_viewport()
    phone.goto(f"{console.url}/console/turns")
    shot(phone, console, "turns-phone")


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802  # http.server's name
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def test_schedules_and_webhook_deliveries_made_over_the_api(browser: Browser, console: Console) -> None:
    schedule = console.api("POST", "/v1/schedules", json={
        "agent": "math", "input": "weekly add 2 and 2", "cron": "0 9 * * 1", "timezone": "Europe/Paris"})
    assert schedule.status_code == 201, schedule.text
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        service = create_key_cli(console.env, console.tenant)
        hook_url = f"http://127.0.0.1:{receiver.server_address[1]}/hooks/steprun"
        endpoint = console.api("POST", "/v1/webhook_endpoints", key=service, json={
            "name": "ops hook", "url": hook_url, "event_types": ["response.completed"]})
        assert endpoint.status_code in (200, 201), endpoint.text
        turn = console.start_turn("math", "add 5 and 8")
        console.wait_status(turn["id"], {"completed"})
        deadline, delivered = time.monotonic() + 30, []
        while not delivered:  # the scheduler fans the event out and sends it
            assert time.monotonic() < deadline, "the delivery was never sent"
            log = console.api("GET", f"/v1/webhook_endpoints/{endpoint.json()['id']}/deliveries?status=delivered",
                              key=service)
            delivered = log.json()["data"]
            time.sleep(0.3)
    finally:
        receiver.shutdown()
        receiver.server_close()
    delivery_id = delivered[0]["id"]

    page = new_page(browser)
    sign_in(page, console, console.admin_key)
    page.get_by_role("navigation").get_by_role("link", name="Schedules").click()
    row = page.get_by_role("row").filter(has_text=schedule.json()["id"])
    expect(row).to_contain_text("0 9 * * 1")
    expect(row).to_contain_text("Europe/Paris")
    expect(row).to_contain_text("alice")
    expect(row.get_by_text("active", exact=True)).to_be_visible()
    shot(page, console, "schedules")

    page.get_by_role("navigation").get_by_role("link", name="Webhooks").click()
    expect(page.locator("#endpoints").get_by_role("row").filter(has_text="ops hook")).to_contain_text(hook_url)
    sent = page.locator("#deliveries").get_by_role("row").filter(has_text=delivery_id)
    expect(sent).to_contain_text("response.completed")
    expect(sent.get_by_text("delivered", exact=True)).to_be_visible()
    expect(sent.locator("td.num").last).to_have_text("200")  # the last status code
    shot(page, console, "webhooks")

    other = new_page(browser)
    sign_in(other, console, console.other_admin_key)
    other.get_by_role("navigation").get_by_role("link", name="Schedules").click()
    expect(other.get_by_text("No schedules yet.")).to_be_visible()
    other.get_by_role("navigation").get_by_role("link", name="Webhooks").click()
    expect(other.get_by_text("No webhook endpoints yet.")).to_be_visible()
    expect(other.get_by_text(delivery_id)).to_have_count(0)

    phone = new_page(browser, PHONE)
    sign_in(phone, console, console.admin_key)
    for path in ("/console/schedules", "/console/webhooks"):
        phone.goto(f"{console.url}{path}")
        width = phone.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"] + 1, (path, width)
