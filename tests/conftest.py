"""Fixtures every suite needs: the real Postgres and Redis of this machine, a throwaway database per run.

Every run creates its own database (schema from the migrations), its own Redis
key prefix and its own Celery queue, so parallel runs and leftovers never mix.
Tests isolate themselves further by acting as fresh random principals.

Layout: ``unit/`` calls services and step code in this process (real database,
no child processes); ``contract/`` pins that each embedded-mode twin behaves like
its production counterpart; ``e2e/`` starts real web / worker / scheduler
processes or `steprun dev` (marked ``e2e``: ``make test-fast`` leaves them out);
``support/`` holds the helpers and the test agents (``STEPRUN_AGENTS=tests.support.agents_*``).
"""
from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from shared.auth.principal import Principal
from shared.db import make_engine
from shared.engine.step import build_runtime
from shared.migrate import upgrade
from shared.runtime import Runtime
from shared.settings import Settings
from tests.support.processes import ADMIN_URL, REDIS_URL, RUN_ID

# The fake OpenAI's ``server`` fixture (unit/test_openai_model.py, e2e/test_openai_e2e.py).
pytest_plugins = ["tests.support.openai_server"]


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
        secret_key=f"test-secret-{RUN_ID}-{secrets.token_hex(16)}",  # long: production refuses short ones
    )


@pytest.fixture(scope="session")
def rt(settings: Settings) -> Iterator[Runtime]:
    runtime = build_runtime(settings)
    yield runtime
    runtime.close()


@pytest.fixture
def runtimes(settings: Settings) -> Iterator[Callable[..., Runtime]]:
    """Build runtimes from the test settings with some of them changed; each is closed after the test."""
    made: list[Runtime] = []

    def make(**changes: Any) -> Runtime:
        runtime = build_runtime(settings.replace(**changes))
        made.append(runtime)
        return runtime
    yield make
    for runtime in made:
        runtime.close()


@pytest.fixture
def who() -> Principal:
    """A fresh principal: nothing any other test wrote belongs to it."""
    return Principal(f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}")
