"""Many users' sessions at once in one gevent worker process: each agent sees only its own context."""
from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor

import requests

from shared.auth.keys import create_key
from shared.auth.principal import SYSTEM
from shared.db import unit_of_work
from shared.runtime import Runtime
from tests.support.processes import Procs, settings_env

USERS = 24


def test_concurrent_sessions_in_one_worker_do_not_bleed(procs: Procs, rt: Runtime) -> None:
    env = settings_env(procs.settings)
    env["STEPRUN_AGENTS"] = "tests.support.agents_isolation"
    procs.worker(concurrency=50, env=env)  # one process, many greenlets
    procs.scheduler(env=env)  # as deployed: the lost-task sweep backs up the broker
    _, url = procs.web(env=env)
    tenant = f"t-{secrets.token_hex(3)}"
    users = []
    for i in range(USERS):
        with unit_of_work(rt.sessions, SYSTEM) as db:  # keys: the system path
            _, key = create_key(db, tenant if i % 2 else f"{tenant}-{i}", f"user{i}")
        h = {"Authorization": f"Bearer {key}"}
        sid = requests.post(f"{url}/v1/sessions", json={"agent": "recite"}, headers=h).json()["id"]
        users.append((i, h, sid))

    def converse(user):  # noqa: ANN001, ANN202
        i, h, sid = user
        outputs = []
        for text in (f"secret-{i}-a", f"whoami secret-{i}-b"):
            tid = requests.post(f"{url}/v1/sessions/{sid}/turns", json={"input": text}, headers=h).json()["id"]
            outputs.append(requests.get(f"{url}/v1/turns/{tid}?wait=60", headers=h).json())
        return i, sid, outputs

    with ThreadPoolExecutor(USERS) as pool:
        results = list(pool.map(converse, users))
    for i, sid, (first, second) in results:
        assert first["status"] == second["status"] == "completed", (first, second)
        assert first["output"] == f"users: secret-{i}-a ; tools:"
        tenant_of_i = tenant if i % 2 else f"{tenant}-{i}"
        assert second["output"] == (f"users: secret-{i}-a | whoami secret-{i}-b ; "
                                    f"tools: {tenant_of_i}/user{i}/{sid}")
        others = [f"secret-{j}-" for j in range(USERS) if j != i]
        assert not any(o in first["output"] + second["output"] for o in others)
