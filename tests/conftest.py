"""Test fixtures: the real Postgres and Redis of this machine, a throwaway database per run.

Every run creates its own database (schema from the migrations), its own Redis
key prefix and its own Celery queue, so parallel runs and leftovers never mix.
Tests isolate themselves further by acting as fresh random principals.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text

from shared.auth.principal import Principal
from shared.db import make_engine
from shared.engine.step import build_runtime
from shared.migrate import upgrade
from shared.runtime import Runtime
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ADMIN_URL = os.environ.get("STEPRUN_TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("STEPRUN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = f"{os.getpid()}_{secrets.token_hex(3)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"steprun_test_{RUN_ID}"
    admin = create_engine(ADMIN_URL.replace("postgresql://", "postgresql+psycopg2://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    engine = make_engine(Settings(database_url=url))
    upgrade(engine)  # the schema comes from the migrations, so the migrations are tested
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=REDIS_URL,
        redis_prefix=f"steprun-test-{RUN_ID}",
        queue_name=f"steprun-test-{RUN_ID}",
        lease_seconds=3.0,
        heartbeat_seconds=0.5,
        lost_task_seconds=5.0,
        sweep_interval=0.5,
        db_role="steprun_app",  # row-level security on, as in production
        # As an operator sets it in production: every web process shares it (stream tokens).
        secret_key=f"test-secret-{RUN_ID}",
    )


@pytest.fixture(scope="session")
def rt(settings: Settings) -> Iterator[Runtime]:
    runtime = build_runtime(settings)
    yield runtime
    runtime.close()


@pytest.fixture
def who() -> Principal:
    """A fresh principal: nothing any other test wrote belongs to it."""
    return Principal(f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}")


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment a steprun process needs to run with ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPRUN_", "DATABASE_URL", "REDIS_URL"))}
    env.update(
        DATABASE_URL=settings.database_url or "",
        REDIS_URL=settings.redis_url or "",
        STEPRUN_REDIS_PREFIX=settings.redis_prefix,
        STEPRUN_QUEUE=settings.queue_name,
        STEPRUN_LEASE_SECONDS=str(settings.lease_seconds),
        STEPRUN_HEARTBEAT_SECONDS=str(settings.heartbeat_seconds),
        STEPRUN_LOST_TASK_SECONDS=str(settings.lost_task_seconds),
        STEPRUN_SWEEP_INTERVAL=str(settings.sweep_interval),
        STEPRUN_DB_ROLE=settings.db_role,
        STEPRUN_SECRET_KEY=settings.secret_key or "",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )
    return env


class Proc:
    """A child process in its own process group, killed with its children at the end."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}-{secrets.token_hex(2)}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        self._log.close()


class Procs:
    def __init__(self, settings: Settings, log_dir: Path):
        self.settings, self.log_dir = settings, log_dir
        self.started: list[Proc] = []

    def start(self, name: str, args: list[str], *, env: dict[str, str] | None = None,
              cwd: Path = ROOT) -> Proc:
        proc = Proc(name, args, env or settings_env(self.settings), cwd, self.log_dir)
        self.started.append(proc)
        return proc

    def web(self, env: dict[str, str] | None = None) -> tuple[Proc, str]:
        """`web` as the Procfile runs it: gunicorn with gevent workers."""
        port = free_port()
        proc = self.start("web", [str(BIN / "gunicorn"), "api.wsgi:app", "-c", "python:api.gunicorn_conf",
                                  "-w", "1", "-b", f"127.0.0.1:{port}"], env=env)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", proc)
        return proc, url

    def worker(self, concurrency: int = 20, env: dict[str, str] | None = None) -> Proc:
        """`worker` as the Procfile runs it: Celery with the gevent pool."""
        proc = self.start("worker", [str(BIN / "celery"), "-A", "workers.celery_app", "worker", "-P", "gevent",
                                     "-c", str(concurrency), "--without-gossip", "--without-mingle",
                                     "--without-heartbeat", "-Q", self.settings.queue_name, "-l", "INFO"], env=env)
        deadline = time.time() + 30
        while "ready." not in proc.log():
            if proc.popen.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"worker did not start:\n{proc.log()[-3000:]}")
            time.sleep(0.1)
        return proc

    def scheduler(self, env: dict[str, str] | None = None) -> Proc:
        return self.start("scheduler", [sys.executable, "-m", "scheduler"], env=env)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.kill(signal.SIGKILL)


def wait_http(url: str, proc: Proc | None = None, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up" + (f":\n{proc.log()[-3000:]}" if proc else ""))


@pytest.fixture
def procs(settings: Settings, tmp_path: Path) -> Iterator[Procs]:
    p = Procs(settings, tmp_path)
    yield p
    p.stop_all()


def create_key_cli(env: dict[str, str], tenant: str, user: str | None = None, cwd: Path = ROOT) -> str:
    """A key made the way an operator makes one: with the `steprun keys create` command."""
    args = [str(BIN / "steprun"), "keys", "create", "--tenant", tenant]
    args += ["--user", user] if user else ["--service"]
    out = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().splitlines()[-1]


@dataclass
class Stack:
    """A running steprun deployment reachable over HTTP, with a key for a fresh user."""

    mode: str
    url: str
    key: str
    env: dict[str, str]
    procs: Procs
    # The Celery worker's own /metrics (production shape); embedded serves everything at {url}/metrics.
    worker_metrics_url: str | None = None

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **extra}

    def new_user_key(self) -> str:
        return create_key_cli(self.env, f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}",
                              cwd=Path(self.env.get("_STEPRUN_CWD", str(ROOT))))


@pytest.fixture(scope="module", params=["production", "embedded"])
def stack(request: pytest.FixtureRequest, settings: Settings,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The same deployment in both shapes: Procfile processes on Postgres+Redis, or `steprun dev`."""
    log_dir = tmp_path_factory.mktemp(f"stack-{request.param}")
    procs = Procs(settings, log_dir)
    worker_metrics_url = None
    try:
        if request.param == "production":
            env = settings_env(settings)
            metrics_port = free_port()
            procs.worker(env={**env, "STEPRUN_WORKER_METRICS_PORT": str(metrics_port),
                              "STEPRUN_METRICS_ADDR": "127.0.0.1"})
            worker_metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            procs.scheduler()
            _, url = procs.web()
        else:
            workdir = tmp_path_factory.mktemp("embedded")
            env = {k: v for k, v in settings_env(settings).items() if k not in ("DATABASE_URL", "REDIS_URL")}
            env.update(STEPRUN_DATA_DIR=str(workdir / ".steprun"), _STEPRUN_CWD=str(workdir))
            port = free_port()
            proc = procs.start("dev", [str(BIN / "steprun"), "dev", "--port", str(port)], env=env, cwd=workdir)
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/healthz", proc)
        key = create_key_cli(env, f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}",
                             cwd=Path(env.get("_STEPRUN_CWD", str(ROOT))))
        yield Stack(request.param, url, key, env, procs, worker_metrics_url)
    finally:
        procs.stop_all()
