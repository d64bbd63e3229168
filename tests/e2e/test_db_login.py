"""The Procfile processes refuse a database login that row-level security would not bind (README, Isolation).

Each of web (gunicorn), worker (Celery) and scheduler is started as deployed, once with
``STEPRUN_DB_ROLE=none`` (one login for everything) and once with the application login pointed at
the test cluster's superuser: each must exit 3 with a one-line reason, without serving anything.
"""
from __future__ import annotations

import time

import pytest

from shared.settings import Settings
from tests.support.processes import BIN, Procs, free_port, settings_env

PROCESSES = ("web", "worker", "scheduler")


def _start(procs: Procs, name: str, env: dict[str, str]):  # noqa: ANN202
    if name == "web":
        return procs.start("web", [str(BIN / "gunicorn"), "api.wsgi:app", "-c", "python:api.gunicorn_conf",
                                   "-w", "1", "-b", f"127.0.0.1:{free_port()}"], env=env)
    if name == "worker":
        return procs.worker(env=env, wait=False)
    return procs.scheduler(env=env, wait=False)


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("unsafe, reason", [
    ({"STEPRUN_DB_ROLE": "none"}, "STEPRUN_DB_ROLE=none"),
    ({"STEPRUN_APP_DATABASE_URL": "superuser"}, "is a superuser"),
])
def test_a_process_refuses_a_login_row_level_security_does_not_bind(procs: Procs, settings: Settings, name: str,
                                                                     unsafe: dict[str, str], reason: str) -> None:
    env = settings_env(settings)
    env.update({k: settings.database_url or "" if v == "superuser" else v for k, v in unsafe.items()})
    proc = _start(procs, name, env)
    deadline = time.time() + 60
    while proc.popen.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    log = proc.log()
    assert proc.popen.poll() == 3, f"{name} did not exit 3:\n{log[-3000:]}"
    assert f"steprun {name}: configuration error:" in log and reason in log, log[-3000:]
