"""The Procfile topology, started locally for one benchmark run and torn down after it.

A throwaway database (created, migrated with shared.migrate.upgrade, dropped),
its own Redis key prefix and Celery queue, and the processes as the Procfile
runs them: gunicorn (gevent) for `web`, Celery (gevent pool) for `worker`, and
`python -m scheduler`. Every process starts in its own process group and is
killed with its children at the end, whatever happened in between.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.agents import write_agents_module

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class StackConfig:
    admin_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    redis_url: str = "redis://127.0.0.1:6379/0"
    workers: int = 2
    worker_concurrency: int = 50
    web_connections: int = 6000
    lease_seconds: float = 10.0
    # None keeps steprun's defaults (STEPRUN_DB_POOL_SIZE / STEPRUN_DB_MAX_OVERFLOW).
    db_pool: int | None = None
    db_overflow: int | None = None
    agent_options: dict = field(default_factory=dict)
    # "": the Procfile's processes exactly. Else proposed fixes patched in (bench/whatif.py).
    whatif: str = ""
    # More STEPRUN_* settings for every served process (e.g. the soak turns the rate limit off).
    extra_env: dict = field(default_factory=dict)
    # Start a private redis-server for the run (exact Redis command counts: nothing else uses it).
    own_redis: bool = False


class Proc:
    """A child process in its own process group; :meth:`kill` takes its children too."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}-{secrets.token_hex(2)}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.pid = self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        if not self._log.closed:
            self._log.close()


class Stack:
    """One local deployment: database, Redis namespace, web + workers + scheduler."""

    def __init__(self, config: StackConfig):
        self.config = config
        self.run_id = f"{os.getpid()}_{secrets.token_hex(3)}"
        self.db_name = f"steprun_bench_{self.run_id}"
        self.database_url = config.admin_url.rsplit("/", 1)[0] + "/" + self.db_name
        self.prefix = f"steprun-bench-{self.run_id}"
        self.queue = f"steprun-bench-{self.run_id}"
        self.tmp = Path(tempfile.mkdtemp(prefix="steprun-bench-"))
        self.secret_key = secrets.token_hex(32)  # web processes sign stream tokens with it; one per run
        self.procs: list[Proc] = []
        self.workers: list[Proc] = []
        self.web: Proc | None = None
        self.url = ""
        self.key = ""
        self._db_created = False

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> Stack:
        from sqlalchemy import create_engine, text

        from shared.db import make_engine
        from shared.migrate import upgrade
        from shared.settings import Settings

        if self.config.own_redis:
            self._start_redis()
        admin = create_engine(self.config.admin_url.replace("postgresql://", "postgresql+psycopg2://"),
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        admin.dispose()
        self._db_created = True
        engine = make_engine(Settings(database_url=self.database_url))
        upgrade(engine)
        engine.dispose()
        self.agents_module = write_agents_module(self.tmp, **self.config.agent_options)
        if self.config.whatif:
            from bench.whatif import SITECUSTOMIZE

            (self.tmp / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.key = self.create_key(f"bench-{self.run_id}", "bench-user")
        for _ in range(self.config.workers):
            self.start_worker()
        self.procs.append(Proc("scheduler", [sys.executable, "-m", "scheduler"], self.env(), self.tmp))
        self.start_web()
        return self

    def _start_redis(self) -> None:
        """A redis-server of the run's own (no persistence), so INFO commandstats counts this run alone."""
        import redis

        port = free_port()
        proc = Proc("redis", [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.tmp)],
                    dict(os.environ), self.tmp)
        self.procs.append(proc)
        self.config.redis_url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 15
        while True:
            try:
                redis.Redis.from_url(self.config.redis_url).ping()
                return
            except redis.RedisError:
                if not proc.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{proc.log()[-2000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()
        self._drop_redis_keys()
        if self._db_created:
            from sqlalchemy import create_engine, text

            admin = create_engine(self.config.admin_url.replace("postgresql://", "postgresql+psycopg2://"),
                                  isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
            admin.dispose()
        # The processes' logs outlive the run, for a look after a surprising figure.
        logs = Path(tempfile.gettempdir()) / "steprun-bench-logs"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir()
        for path in [*self.tmp.glob("*.log"), *self.tmp.glob("*.json")]:
            shutil.copy(path, logs / path.name)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _drop_redis_keys(self) -> None:
        try:
            import redis

            client = redis.Redis.from_url(self.config.redis_url)
            # Tasks of workers this run SIGKILLed stay in kombu's "unacked" hash, which is global to the
            # Redis db: left there, the next Celery worker of *any* run would restore them into this
            # run's queue after it was deleted. Drop ours first.
            for tag, raw in client.hscan_iter("unacked"):
                try:
                    routing_key = json.loads(raw)[2]
                except (ValueError, IndexError, TypeError):
                    continue
                if routing_key == self.queue:
                    client.hdel("unacked", tag)
                    client.zrem("unacked_index", tag)
            for pattern in (f"{self.prefix}:*", f"{self.queue}*", f"_kombu.binding.{self.queue}*"):
                keys = list(client.scan_iter(match=pattern, count=1000))
                for i in range(0, len(keys), 500):
                    client.delete(*keys[i:i + 500])
            client.close()
        except Exception:  # noqa: BLE001 - leftovers in Redis expire; never fail the report over them
            pass

    # --- processes --------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a served process: this run's database, prefix, queue and agents."""
        c = self.config
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPRUN_", "DATABASE_URL", "REDIS_URL"))}
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=c.redis_url,
            STEPRUN_REDIS_PREFIX=self.prefix,
            STEPRUN_QUEUE=self.queue,
            STEPRUN_AGENTS=self.agents_module,
            STEPRUN_SECRET_KEY=self.secret_key,
            STEPRUN_LEASE_SECONDS=str(c.lease_seconds),
            STEPRUN_HEARTBEAT_SECONDS=str(max(0.5, c.lease_seconds / 5)),
            STEPRUN_WORKER_CONCURRENCY=str(c.worker_concurrency),
            PYTHONPATH=os.pathsep.join([str(self.tmp), str(ROOT)]),
            PYTHONUNBUFFERED="1",
            BENCH_WHATIF=c.whatif,
            # A benchmark measures what a process can carry: fan-out follows one user's session with 50
            # clients, past the per-user stream cap a deployment keeps (STEPRUN_MAX_STREAMS_PER_*).
            STEPRUN_MAX_STREAMS_PER_USER="0",
            STEPRUN_MAX_STREAMS_PER_TENANT="0",
            # All the bench's users are one tenant: its limits stay checked (their cost is measured) but
            # are set past any load the bench makes, so they never shape the figures.
            STEPRUN_RATE_LIMIT_PER_TENANT="100000000",
            STEPRUN_MAX_QUEUED_TURNS_PER_TENANT="100000000",
        )
        env.update(c.extra_env)
        if c.db_pool is not None:
            env["STEPRUN_DB_POOL_SIZE"] = str(c.db_pool)
        if c.db_overflow is not None:
            env["STEPRUN_DB_MAX_OVERFLOW"] = str(c.db_overflow)
        env.update(extra)
        return env

    def start_web(self) -> None:
        """`web` exactly as the Procfile runs it, with one gevent worker process (-w 1)."""
        port = free_port()
        env = self.env(STEPRUN_WORKER_CONNECTIONS=str(self.config.web_connections), WEB_CONCURRENCY="1",
                       PORT=str(port))
        self.web = Proc("web", [str(BIN / "gunicorn"), "api.wsgi:app", "-c", "python:api.gunicorn_conf",
                                "-b", f"127.0.0.1:{port}"], env, self.tmp)
        self.procs.append(self.web)
        self.url = f"http://127.0.0.1:{port}"
        self._wait_http(f"{self.url}/healthz", self.web)

    def start_worker(self, autoscale: str | None = None) -> Proc:
        """`worker` as the Procfile runs it: Celery with the gevent pool (``autoscale`` "max,min" replaces -c)."""
        size = [f"--autoscale={autoscale}"] if autoscale else ["-c", str(self.config.worker_concurrency)]
        args = [str(BIN / "celery"), "-A", "workers.celery_app", "worker", "-P", "gevent", *size,
                "-Q", self.queue, "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"]
        proc = Proc("worker", args, self.env(), self.tmp)
        self.procs.append(proc)
        self.workers.append(proc)
        deadline = time.monotonic() + 45
        while "ready." not in proc.log():
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{proc.log()[-3000:]}")
            time.sleep(0.1)
        return proc

    def kill_worker(self, proc: Proc) -> None:
        proc.kill(signal.SIGKILL)
        self.workers.remove(proc)

    def api_pid(self) -> int:
        """The gunicorn worker process (the arbiter's child) that serves every request."""
        assert self.web is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = _children(self.web.pid)
            if children:
                return children[0]
            time.sleep(0.1)
        raise RuntimeError("gunicorn has no worker process")

    @staticmethod
    def _wait_http(url: str, proc: Proc, timeout: float = 45) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{url} did not come up:\n{proc.log()[-3000:]}")

    # --- data -------------------------------------------------------------------

    def create_key(self, tenant: str, user: str) -> str:
        """A key made the way an operator makes one: `steprun keys create`."""
        out = subprocess.run([str(BIN / "steprun"), "keys", "create", "--tenant", tenant, "--user", user],
                             env=self.env(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.strip().splitlines()[-1]

    def users(self, count: int) -> list[tuple[str, str]]:
        """``count`` end users of one tenant, as (user id, key): load comes from many users, as in production,
        so per-user limits (requests a minute, queued turns) apply as they would. Made straight in Postgres."""
        from sqlalchemy.orm import Session

        from shared.auth.keys import create_key

        have = getattr(self, "_users", [])
        if len(have) < count:
            with Session(self.engine()) as db:
                for i in range(len(have), count):
                    have.append((f"u{i}", create_key(db, f"bench-{self.run_id}", f"u{i}", "bench")[1]))
                db.commit()
            self._users = have
        return have[:count]

    def seed_sessions(self, agent: str, count: int, per_user: int = 20) -> list[tuple[str, str]]:
        """``count`` sessions, ``per_user`` per end user, written straight to Postgres; as (session id, key)."""
        from shared.models import AgentSession, new_id

        users = self.users((count + per_user - 1) // per_user)
        rows = [(new_id("ses"), users[i // per_user]) for i in range(count)]
        with self.engine().begin() as conn:
            conn.execute(AgentSession.__table__.insert(), [
                {"id": sid, "tenant_id": f"bench-{self.run_id}", "user_id": user, "agent": agent, "metadata": {},
                 "turn_count": 0} for sid, (user, _) in rows])
        return [(sid, key) for sid, (_, key) in rows]

    def pg_backend_pids(self) -> list[int]:
        """Postgres server processes serving this run's database (their CPU is the database's share)."""
        from sqlalchemy import text

        with self.engine().connect() as conn:
            return [int(p) for p in conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"),
                {"db": self.db_name}).scalars()]

    def redis_pid(self) -> list[int]:
        """The Redis server (shared with anything else using it on this machine)."""
        import redis

        client = redis.Redis.from_url(self.config.redis_url)
        try:
            return [int(client.info("server")["process_id"])]
        finally:
            client.close()

    def engine(self):  # type: ignore[no-untyped-def]
        if not hasattr(self, "_engine"):
            from shared.db import make_engine
            from shared.settings import Settings

            self._engine = make_engine(Settings(database_url=self.database_url, db_pool_size=2, db_max_overflow=2))
        return self._engine

    def dispose(self) -> None:
        if hasattr(self, "_engine"):
            self._engine.dispose()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
