"""`steprun dev` from a clean directory: no services configured, state survives a restart."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import requests

from tests.support.processes import BIN, ROOT, Procs, free_port, wait_http


def _start_dev(procs: Procs, workdir: Path, port: int):  # noqa: ANN202
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STEPRUN_") and k not in ("DATABASE_URL", "REDIS_URL")}
    env["PYTHONUNBUFFERED"] = "1"
    env["STEPRUN_AGENTS"] = "tests.support.agents_slow"
    env["PYTHONPATH"] = str(ROOT)
    proc = procs.start("dev", [str(BIN / "steprun"), "dev", "--port", str(port)], env=env, cwd=workdir)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


def test_dev_runs_from_a_clean_directory_and_survives_a_restart(procs: Procs, tmp_path: Path) -> None:
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    dev = _start_dev(procs, workdir, port)
    key = (workdir / ".steprun" / "dev-key").read_text().strip()
    printed = dev.log()
    assert url in printed and key in printed and "curl" in printed  # the banner a newcomer copies from
    assert (workdir / ".steprun" / "steprun.db").exists()
    h = {"Authorization": f"Bearer {key}"}

    sid = requests.post(f"{url}/v1/sessions", json={"agent": "slow"}, headers=h).json()["id"]
    tid = requests.post(f"{url}/v1/sessions/{sid}/turns", json={"input": "first"}, headers=h).json()["id"]
    done = requests.get(f"{url}/v1/turns/{tid}?wait=30", headers=h).json()
    assert done["status"] == "completed"

    # A second turn is killed mid-stream with the whole process.
    tid2 = requests.post(f"{url}/v1/sessions/{sid}/turns", json={"input": "second"}, headers=h).json()["id"]
    deadline = time.time() + 20
    while time.time() < deadline:
        events = requests.get(f"{url}/v1/sessions/{sid}/events?after=0", headers=h).json()["data"]
        if any(e["type"] == "message.delta" and e["turn_id"] == tid2 for e in events):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the second turn never streamed")
    dev.kill(signal.SIGKILL)

    # Same directory, same key, same session: the history is in the SQLite file.
    _start_dev(procs, workdir, port)
    assert (workdir / ".steprun" / "dev-key").read_text().strip() == key
    session = requests.get(f"{url}/v1/sessions/{sid}", headers=h)
    assert session.status_code == 200 and session.json()["agent"] == "slow"
    history = requests.get(f"{url}/v1/sessions/{sid}/messages", headers=h).json()["data"]
    assert [m["content"] for m in history[:2]] == ["first", done["output"]]

    # The interrupted turn is resumed from its checkpoint when the process comes back.
    resumed = requests.get(f"{url}/v1/turns/{tid2}?wait=30", headers=h).json()
    assert resumed["status"] == "completed", resumed
    assert resumed["output"].startswith("You said: second")
    history = requests.get(f"{url}/v1/sessions/{sid}/messages", headers=h).json()["data"]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[3]["content"] == resumed["output"]
    events = requests.get(f"{url}/v1/sessions/{sid}/events?after=0", headers=h).json()["data"]
    assert any(e["type"] == "step.retrying" and e["turn_id"] == tid2 for e in events)
    assert json.dumps(events)  # well-formed
