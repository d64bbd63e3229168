"""Helpers for the recovery and lifecycle tests.

- :class:`Client`: the public HTTP API, the way a polling client uses it;
- :func:`deploy`: web / worker / scheduler processes (the Procfile's) on a fresh
  database of their own, so their scheduler's sweeps never touch other tests' rows;
- :class:`OwnRedis` and :class:`OwnPostgres`: servers started by the test on free
  loopback ports, which a test may kill and restart. The machine's shared Redis
  and Postgres are never restarted: other people's tests use them.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, text

from shared.auth.keys import create_key
from shared.db import make_engine, make_sessionmaker, unit_of_work
from shared.migrate import upgrade
from shared.models import TERMINAL
from shared.settings import Settings
from tests.support.processes import ADMIN_URL, Proc, Procs, free_port, settings_env

AGENTS_MODULE = "tests.support.agents_recovery"


# --- the client ---------------------------------------------------------------

class Client:
    """What a client sees: HTTP only. ``url`` may be switched to another API process."""

    def __init__(self, url: str, key: str):
        self.url, self.key = url, key
        self.http = requests.Session()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.http.get(self.url + path, headers=self.headers, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> requests.Response:
        return self.http.post(self.url + path, json=body, headers=self.headers, timeout=kw.pop("timeout", 30), **kw)

    def session(self, agent: str) -> str:
        r = self.post("/v1/sessions", {"agent": agent})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def start(self, session_id: str, text: str, **body: Any) -> dict[str, Any]:
        r = self.post(f"/v1/sessions/{session_id}/turns", {"input": text, **body})
        assert r.status_code == 202, r.text
        return r.json()

    def turn(self, turn_id: str) -> dict[str, Any]:
        r = self.get(f"/v1/turns/{turn_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_turn(self, turn_id: str, timeout: float = 30, statuses: frozenset[str] | None = None) -> dict[str, Any]:
        """Long-poll until the turn is terminal or paused (or in ``statuses``)."""
        wanted = statuses or (TERMINAL | {"requires_action"})
        deadline = time.monotonic() + timeout
        while True:
            r = self.get(f"/v1/turns/{turn_id}?wait={min(5.0, max(0.1, deadline - time.monotonic())):.1f}")
            if r.status_code == 200 and r.json()["status"] in wanted:
                return r.json()
            if time.monotonic() > deadline:
                raise AssertionError(f"turn {turn_id} did not reach {sorted(wanted)}: {r.status_code} {r.text}")
            if r.status_code != 200:
                time.sleep(0.2)

    def events(self, session_id: str, after: int = 0, wait: float = 0) -> requests.Response:
        return self.get(f"/v1/sessions/{session_id}/events?after={after}&wait={wait}")

    def all_events(self, session_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = 0
        while True:
            r = self.events(session_id, after)
            assert r.status_code == 200, r.text
            body = r.json()
            out += body["data"]
            if not body["data"]:
                return out
            after = body["next"]

    def wait_event(self, session_id: str, match: Callable[[dict[str, Any]], bool], after: int = 0,
                   timeout: float = 20) -> dict[str, Any]:
        """The first event after ``after`` that ``match`` accepts (long-polling the JSON route)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.events(session_id, after, wait=min(2.0, max(0.1, deadline - time.monotonic())))
            if r.status_code != 200:
                time.sleep(0.1)
                continue
            body = r.json()
            for event in body["data"]:
                if match(event):
                    return event
            after = body["next"]
        raise AssertionError(f"no matching event in session {session_id} after cursor {after}")

    def messages(self, session_id: str) -> list[dict[str, Any]]:
        r = self.get(f"/v1/sessions/{session_id}/messages?limit=100")
        assert r.status_code == 200, r.text
        return r.json()["data"]


def is_(type_: str, **data: Any) -> Callable[[dict[str, Any]], bool]:
    """An event matcher: type and data fields."""
    return lambda e: e["type"] == type_ and all(e["data"].get(k) == v for k, v in data.items())


def streamed_text(events: list[dict[str, Any]], turn_id: str) -> str:
    """What a client shows for a turn: each step's deltas from the attempt that committed it."""
    committed = {e["data"]["step"]: e["data"]["attempt"] for e in events
                 if e["type"] == "step.completed" and e["turn_id"] == turn_id}
    return "".join(e["data"]["text"] for e in events
                   if e["type"] == "message.delta" and e["turn_id"] == turn_id
                   and committed.get(e["data"]["step"]) == e["data"]["attempt"])


# --- deployments on their own database ----------------------------------------------

def fresh_database(admin_url: str = ADMIN_URL) -> str:
    """A new database with the schema from the migrations; its URL."""
    name = f"steprun_rec_{secrets.token_hex(4)}"
    admin = create_engine(admin_url.replace("postgresql://", "postgresql+psycopg2://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    engine = make_engine(Settings(database_url=url))
    upgrade(engine)
    engine.dispose()
    return url


def drop_database(url: str, admin_url: str = ADMIN_URL) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_engine(admin_url.replace("postgresql://", "postgresql+psycopg2://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def new_key(database_url: str) -> str:
    """A key for a fresh user, made the way `steprun keys create` makes one (without a process)."""
    engine = make_engine(Settings(database_url=database_url))
    with unit_of_work(make_sessionmaker(engine)) as db:
        _, raw = create_key(db, f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}", "recovery tests")
    engine.dispose()
    return raw


@dataclass
class Deployment:
    settings: Settings
    env: dict[str, str]
    procs: Procs
    url: str = ""
    key: str = ""
    webs: list[Proc] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)

    def client(self) -> Client:
        return Client(self.url, self.key)

    def worker(self, **env: str) -> Proc:
        proc = self.procs.worker(env={**self.env, **env})
        self.workers.append(proc)
        return proc

    def web(self) -> tuple[Proc, str]:
        proc, url = self.procs.web(env=self.env)
        self.webs.append(proc)
        return proc, url


def deploy(procs: Procs, settings: Settings, *, worker: bool = True, scheduler: bool = True,
           **env: str) -> Deployment:
    """web (+ worker, + scheduler) for ``settings``, serving the test agents; extra env as STEPRUN_X=..."""
    full_env = {**settings_env(settings), "STEPRUN_AGENTS": AGENTS_MODULE, **env}
    d = Deployment(settings, full_env, procs)
    if worker:
        d.worker()
    if scheduler:
        procs.scheduler(env=full_env)
    _, d.url = d.web()
    d.key = new_key(settings.database_url or "")
    return d


def own_settings(base: Settings, database_url: str, **changes: Any) -> Settings:
    """``base`` on another database, with a Redis prefix and queue of its own."""
    tag = secrets.token_hex(3)
    return base.replace(database_url=database_url, redis_prefix=f"{base.redis_prefix}-{tag}",
                        queue_name=f"{base.queue_name}-{tag}", **changes)


def kill_group(proc: Proc, sig: int = signal.SIGKILL) -> None:
    """Signal a process and its children (its own process group), as a platform stops a dyno."""
    try:
        os.killpg(proc.popen.pid, sig)
    except ProcessLookupError:
        pass


# --- servers of the test's own ----------------------------------------------------

class OwnRedis:
    """A redis-server on a free loopback port, without persistence: a restart loses everything.

    Unless :meth:`snapshot` saved its data first: a later start loads that snapshot, as Redis's
    default persistence does after a crash (everything written after it is lost).
    """

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.workdir / "redis.log", "ab")
        self.popen = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def snapshot(self) -> None:
        """Save the data now (SAVE): the next start comes back with it."""
        import redis

        client = redis.Redis.from_url(self.url)
        client.save()
        client.close()

    def forget(self) -> None:
        """Delete any snapshot: the next start comes back empty."""
        (self.workdir / "dump.rdb").unlink(missing_ok=True)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)


def pg_bindir() -> Path:
    """Where this machine's PostgreSQL server programs (initdb, pg_ctl) are: ``pg_config --bindir``."""
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=30, check=True)
    return Path(out.stdout.strip())


class OwnPostgres:
    """A PostgreSQL cluster in a temp dir (initdb), trust auth, on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        # Not under pytest's tmp_path: that is private to root, and postgres refuses to run as root.
        self.workdir = Path(tempfile.mkdtemp(prefix="steprun-pg-"))
        self.dir = self.workdir / "pgdata"
        self.socket_dir = self.workdir / "pgsock"
        self.log = self.workdir / "postgres.log"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres = os.geteuid() == 0
        self.bin = pg_bindir()
        self.socket_dir.mkdir()
        if self._as_postgres:
            for path in (self.workdir, self.socket_dir):
                shutil.chown(path, "postgres", "postgres")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=check)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.dir), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.dir), "-o", options, "-l", str(self.log), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.dir), "-m", mode, "-w", "-t", "30", "stop", check=False)

    def remove(self) -> None:
        """Stop the server and delete its files."""
        self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)
