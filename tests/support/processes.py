"""What the suites share besides fixtures: the machine's services, and steprun processes to start.

- ``ADMIN_URL`` / ``REDIS_URL``: the real Postgres and Redis of this machine;
  ``RUN_ID`` names this run's database, Redis prefix and Celery queue;
- :class:`Procs`: web / worker / scheduler / `steprun dev` processes, each in its
  own process group, killed with their children at the end;
- :func:`create_key_cli`: a key made the way an operator makes one;
- :class:`Stack`: a running deployment reachable over HTTP (the e2e ``stack`` fixture).
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ADMIN_URL = os.environ.get("STEPRUN_TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("STEPRUN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = f"{os.getpid()}_{secrets.token_hex(3)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    def worker(self, concurrency: int = 20, env: dict[str, str] | None = None, wait: bool = True) -> Proc:
        """`worker` as the Procfile runs it: Celery with the gevent pool (``wait``: until it is ready)."""
        proc = self.start("worker", [str(BIN / "celery"), "-A", "workers.celery_app", "worker", "-P", "gevent",
                                     "-c", str(concurrency), "--without-gossip", "--without-mingle",
                                     "--without-heartbeat", "-Q", self.settings.queue_name, "-l", "INFO"], env=env)
        return _ready(proc, "ready.") if wait else proc

    def scheduler(self, env: dict[str, str] | None = None, wait: bool = True) -> Proc:
        """`scheduler` as the Procfile runs it (``wait``: until it says it started; its first round follows)."""
        proc = self.start("scheduler", [sys.executable, "-m", "scheduler"], env=env)
        return _ready(proc, "scheduler started") if wait else proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.kill(signal.SIGKILL)


def _ready(proc: Proc, line: str, timeout: float = 30) -> Proc:
    """``proc`` once its log holds ``line``; an error with the log's tail if it exits or takes too long."""
    deadline = time.time() + timeout
    while line not in proc.log():
        if proc.popen.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{proc.name} did not start:\n{proc.log()[-3000:]}")
        time.sleep(0.1)
    return proc


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
