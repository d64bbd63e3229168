"""Fixtures of the end-to-end suite: real processes. Every test under tests/e2e is marked ``e2e``."""
from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from shared.settings import Settings
from tests.support.processes import BIN, ROOT, Procs, Stack, create_key_cli, free_port, settings_env, wait_http

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)


# What a real fleet would pick up and run: left by the in-process tests (unit/, contract/), which share this
# run's database and queue but start no worker.
_WORK_TABLES = ("sessions", "turns", "model_calls", "tool_calls", "trace_spans", "schedules", "webhook_endpoints",
                "webhook_events", "webhook_deliveries", "worker_heartbeats", "queue_samples")


@pytest.fixture(scope="package", autouse=True)
def no_work_left_behind(settings: Settings) -> None:
    """Before the first process starts: no turn queued or running, no schedule due, no webhook retrying, no
    task in the queue. The in-process tests leave all of these (a turn whose test ended mid-step, a task no
    worker took); the first scheduler started here would recover them and keep its workers busy with them,
    and a test's own turn would wait behind hundreds (``pytest tests/unit tests/e2e`` failed so, while the
    usual order, e2e first, passed). Keys and tenants stay: nothing runs from them."""
    engine = create_engine((settings.database_url or "").replace("postgresql://", "postgresql+psycopg2://"))
    try:
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '10s'"))  # a test holding a lock fails here, not later
            conn.execute(text(f"TRUNCATE {', '.join(_WORK_TABLES)} CASCADE"))
    finally:
        engine.dispose()
    client = redis.Redis.from_url(settings.redis_url)
    try:
        # The queue's lists: one per priority step, the plain name for the lowest (kombu's Redis transport).
        client.delete(settings.queue_name, *client.scan_iter(match=f"{settings.queue_name}\x06\x16*"))
    finally:
        client.close()


@pytest.fixture
def procs(settings: Settings, tmp_path: Path) -> Iterator[Procs]:
    p = Procs(settings, tmp_path)
    yield p
    p.stop_all()


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
