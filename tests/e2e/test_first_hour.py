"""The first hour of a newcomer, with real processes: own agents, `steprun dev` traps, deployments that
refuse to half-start, processes that stop when told (web SIGTERM, `steprun start`, `make bench`)."""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import websocket
from sqlalchemy import create_engine, text

from shared.settings import Settings
from tests.support.processes import (
    ADMIN_URL,
    BIN,
    REDIS_URL,
    ROOT,
    Proc,
    Procs,
    create_key_cli,
    free_port,
    settings_env,
    wait_http,
)


def dev_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STEPRUN_") and k not in ("DATABASE_URL", "REDIS_URL", "OPENAI_BASE_URL")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **extra)
    return env


def start_dev(procs: Procs, workdir: Path, port: int, **extra: str) -> Proc:
    proc = procs.start("dev", [str(BIN / "steprun"), "dev", "--port", str(port)], env=dev_env(**extra), cwd=workdir)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


def dev_key(workdir: Path) -> dict[str, str]:
    return {"Authorization": "Bearer " + (workdir / ".steprun" / "dev-key").read_text().strip()}


def run_turn(url: str, h: dict[str, str], agent: str, text_in: str, wait: float = 30) -> dict:
    sid = requests.post(f"{url}/v1/sessions", json={"agent": agent}, headers=h).json()["id"]
    tid = requests.post(f"{url}/v1/sessions/{sid}/turns", json={"input": text_in}, headers=h).json()["id"]
    return requests.get(f"{url}/v1/turns/{tid}?wait={wait}", headers=h).json()


def test_version() -> None:
    out = subprocess.run([str(BIN / "steprun"), "--version"], capture_output=True, text=True, timeout=30,
                         env=dev_env())
    assert out.returncode == 0 and re.fullmatch(r"steprun \d+\.\d+\.\d+\S*\n", out.stdout)


MYAPP = '''
from shared.agent import Agent, tool
import asyncio

@tool
async def shout(text: str) -> str:
    """Say it louder."""
    await asyncio.sleep(0.01)
    return text.upper()

@tool
def explode(text: str) -> str:
    """Always fails."""
    raise RuntimeError("boom")

AGENTS = [Agent(name="mine", model="scripted", tools=[shout, explode])]
'''


def test_own_agents_from_the_working_directory_with_async_tools(procs: Procs, tmp_path: Path) -> None:
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "agents.py").write_text(MYAPP)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    dev = start_dev(procs, tmp_path, port, STEPRUN_AGENTS="myapp.agents")
    h = dev_key(tmp_path)
    done = run_turn(url, h, "mine", "shout hello")
    assert done["status"] == "completed" and done["output"] == "The result of shout is HELLO.", done
    failed = run_turn(url, h, "mine", "explode now")
    assert failed["status"] == "completed" and "RuntimeError: boom" in failed["output"]
    # The operator's log names the turn and step of the tool that raised, with its traceback.
    deadline = time.time() + 10
    while f"turn {failed['id']} step 0: tool explode" not in dev.log() and time.time() < deadline:
        time.sleep(0.1)
    log = dev.log()
    assert f"turn {failed['id']} step 0: tool explode" in log and "Traceback" in log


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("nosuchapp.agents", None, "STEPRUN_AGENTS=nosuchapp.agents: no module named 'nosuchapp' (searched: "),
    ("badapp", "from shared.agent import Agent\nAGENTS = [Agent(name='b', model='gpt-4o')]\n",
     "agent 'b': unknown model 'gpt-4o'"),
])
def test_agent_errors_at_start_are_one_line(tmp_path: Path, module: str, source: str | None, expected: str) -> None:
    if source:
        (tmp_path / f"{module}.py").write_text(source)
    out = subprocess.run([str(BIN / "steprun"), "dev", "--port", str(free_port())], cwd=tmp_path, timeout=60,
                         env=dev_env(STEPRUN_AGENTS=module), capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr


def test_a_second_dev_on_the_same_folder_refuses_before_touching_anything(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = start_dev(procs, tmp_path, port, STEPRUN_AGENTS="tests.support.agents_chat")
    h = dev_key(tmp_path)
    sid = requests.post(f"{url}/v1/sessions", json={"agent": "long"}, headers=h).json()["id"]
    tid = requests.post(f"{url}/v1/sessions/{sid}/turns", json={"input": "go"}, headers=h).json()["id"]
    second = subprocess.run([str(BIN / "steprun"), "dev", "--port", str(free_port())], cwd=tmp_path, timeout=60,
                            env=dev_env(STEPRUN_AGENTS="tests.support.agents_chat"), capture_output=True, text=True)
    assert second.returncode == 1
    assert "another `steprun dev`" in second.stderr and str(first.popen.pid) in second.stderr
    assert "alembic" not in second.stderr + second.stdout  # it stopped before opening the database
    done = requests.get(f"{url}/v1/turns/{tid}?wait=40", headers=h).json()
    assert done["status"] == "completed" and done["output"].startswith("You said: go")  # not stolen, not re-run
    # The same port taken by another program: one line, before anything is recovered either.
    (tmp_path / "other").mkdir()
    busy = subprocess.run([str(BIN / "steprun"), "dev", "--port", str(port)], cwd=tmp_path / "other", timeout=60,
                          env=dev_env(), capture_output=True, text=True)
    assert busy.returncode == 1 and f"Port {port} is in use" in busy.stderr
    assert not (tmp_path / "other" / ".steprun" / "steprun.db").exists()


def test_dev_files_are_private_and_logs_have_no_colour_codes(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    log_file = tmp_path / "dev.json.log"
    dev = start_dev(procs, tmp_path, port)
    requests.get(f"http://127.0.0.1:{port}/v1/agents", headers=dev_key(tmp_path))
    data = tmp_path / ".steprun"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("steprun.db", "dev-key"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    deadline = time.time() + 5
    while "GET /v1/agents" not in dev.log() and time.time() < deadline:
        time.sleep(0.1)
    assert "GET /v1/agents" in dev.log() and "\x1b" not in dev.log()
    dev.kill(signal.SIGTERM)
    # JSON logs too.
    jdev = start_dev(procs, tmp_path, free_port(), STEPRUN_LOG_FORMAT="json")
    deadline = time.time() + 5
    while '"GET /healthz' not in jdev.log() and time.time() < deadline:
        time.sleep(0.1)
    lines = [json.loads(line) for line in jdev.log().splitlines() if line.startswith("{")]
    requests_logged = [e["message"] for e in lines if "GET /healthz" in e["message"]]
    assert requests_logged and not any("\x1b" in m for m in requests_logged)
    log_file.write_text(jdev.log())


class HangingServer:
    """Accepts connections and never answers: a model provider that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.held: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for s in self.held:
            s.close()


def test_embedded_step_time_limit_and_cancel_interrupt_a_blocked_model_call(procs: Procs, tmp_path: Path) -> None:
    hang = HangingServer()
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        start_dev(procs, tmp_path, port, STEPRUN_AGENTS="tests.support.agents_chat", OPENAI_BASE_URL=hang.url,
                  STEPRUN_STEP_TIME_LIMIT="3")
        h = dev_key(tmp_path)
        started = time.monotonic()
        limited = run_turn(url, h, "hang", "hello?", wait=60)
        took = time.monotonic() - started
        assert limited["status"] != "running" and limited["error"], limited
        assert "time" in json.dumps(limited["error"]).lower()
        assert took < 15, f"the 3 s step limit took {took:.1f}s"  # was minutes: the request timeout, retried

        sid = requests.post(f"{url}/v1/sessions", json={"agent": "hang"}, headers=h).json()["id"]
        tid = requests.post(f"{url}/v1/sessions/{sid}/turns", json={"input": "again"}, headers=h).json()["id"]
        time.sleep(0.5)
        asked = time.monotonic()
        requests.post(f"{url}/v1/turns/{tid}/cancel", headers=h)
        done = requests.get(f"{url}/v1/turns/{tid}?wait=30", headers=h).json()
        assert done["status"] == "cancelled", done
        assert time.monotonic() - asked < 2.9  # before the 3 s limit could have ended it
    finally:
        hang.close()


# --- production processes ---------------------------------------------------------------------------

def _run_briefly(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=90)


def test_a_half_configured_deployment_refuses_to_start(settings: Settings) -> None:
    env = settings_env(settings)
    no_redis = {**env, "REDIS_URL": ""}
    no_secret = {**env, "STEPRUN_SECRET_KEY": ""}
    gunicorn = [str(BIN / "gunicorn"), "api.wsgi:app", "-c", "python:api.gunicorn_conf", "-b",
                f"127.0.0.1:{free_port()}"]
    web = _run_briefly(gunicorn, no_redis)
    assert web.returncode != 0 and "DATABASE_URL is set but REDIS_URL is not" in web.stderr
    web = _run_briefly(gunicorn, no_secret)
    assert web.returncode != 0 and "STEPRUN_SECRET_KEY is not set" in web.stderr
    worker = _run_briefly([str(BIN / "celery"), "-A", "workers.celery_app", "worker", "-P", "gevent"], no_redis)
    assert worker.returncode != 0 and "REDIS_URL is not" in worker.stdout + worker.stderr
    sched = _run_briefly([sys.executable, "-m", "scheduler"], {**env, "DATABASE_URL": ""})
    assert sched.returncode == 3 and sched.stderr.strip().splitlines() == [
        "steprun scheduler: configuration error: REDIS_URL is set but DATABASE_URL is not: the scheduler "
        "process needs both (or neither, with `steprun dev`)"]


def test_web_sigterm_closes_streams_with_a_code_and_exits_within_seconds(procs: Procs, settings: Settings) -> None:
    env = settings_env(settings)
    procs.worker()
    web, url = procs.web(env=env)
    key = create_key_cli(env, f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}")
    h = {"Authorization": f"Bearer {key}"}
    sid = requests.post(f"{url}/v1/sessions", json={"agent": "math"}, headers=h).json()["id"]
    done = requests.post(f"{url}/v1/sessions/{sid}/turns?wait=30", json={"input": "add 2 3"}, headers=h).json()
    last = requests.get(f"{url}/v1/sessions/{sid}/events?after=0", headers=h).json()["next"]
    assert last > 0, done
    ws = websocket.create_connection(url.replace("http", "ws") + f"/v1/sessions/{sid}/ws?after={last}",
                                     header=[f"Authorization: Bearer {key}"], timeout=20)
    sse = requests.get(f"{url}/v1/sessions/{sid}/events/stream", headers={**h, "Last-Event-ID": str(last)},
                       stream=True, timeout=20)
    lines = sse.iter_lines(decode_unicode=True)
    assert next(lines).startswith("retry:")
    keepalive = requests.Session()
    assert keepalive.get(f"{url}/healthz").status_code == 200  # an idle keep-alive connection stays open
    time.sleep(0.5)

    sent = time.monotonic()
    os.kill(web.popen.pid, signal.SIGTERM)
    seen = last
    for _ in range(100):
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
        seen = max(seen, json.loads(data).get("cursor") or 0)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    code = int.from_bytes(data[:2], "big")
    assert code == 1012 and json.loads(data[2:]) == {"reason": "server_restart", "cursor": seen}
    ended = []
    for line in lines:
        ended.append(line)
        if line.startswith("data:") and "server_restart" in line:
            break
    sse_seen = max([last] + [int(x[4:]) for x in ended if x.startswith("id: ")])
    assert "event: error" in ended and json.loads(ended[-1][5:])["error"]["cursor"] == sse_seen
    try:
        web.popen.wait(timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError("the web process did not exit:\n" + web.log()[-1500:]) from None
    exited = time.monotonic() - sent
    print(f"web exited {exited:.2f}s after SIGTERM with a WebSocket, an SSE stream and a keep-alive open")
    assert exited < 6, f"took {exited:.1f}s"
    assert "[ERROR]" not in web.log(), web.log()[-2000:]  # idle connections end quietly
    keepalive.close()


def _steprun_start(procs: Procs, settings: Settings, cwd: Path, *, workers: int,
                   concurrency: int) -> tuple[Proc, int, dict[str, str]]:
    """`steprun start` with one web worker, once it serves and its workers said ready: (it, its port, its env)."""
    port = free_port()
    env = {**settings_env(settings), "PORT": str(port), "STEPRUN_WORKER_CONCURRENCY": str(concurrency)}
    start = procs.start("start", [str(BIN / "steprun"), "start", "--workers", str(workers), "--web-workers", "1"],
                        env=env, cwd=cwd)
    wait_http(f"http://127.0.0.1:{port}/healthz", start, timeout=60)
    deadline = time.time() + 60
    while start.log().count("ready.") < workers and time.time() < deadline:
        time.sleep(0.2)
    return start, port, env


def test_steprun_start_killed_takes_its_processes_with_it(procs: Procs, settings: Settings, tmp_path: Path) -> None:
    """SIGKILL leaves `steprun start` no time to stop anything: its processes (each in a session of its own)
    stop by themselves, rather than serve on with nobody watching them."""
    start, _, _ = _steprun_start(procs, settings, tmp_path, workers=1, concurrency=2)
    children = [int(p) for p in re.findall(r"\(pid (\d+)\)", start.log())]
    assert len(children) == 3, start.log()[-3000:]  # web, a worker, the scheduler
    os.kill(start.popen.pid, signal.SIGKILL)
    start.popen.wait(timeout=10)
    deadline = time.time() + 40  # a worker's own shutdown grace is 20 s
    alive = children
    while alive and time.time() < deadline:
        alive = [pid for pid in alive if _running(pid)]
        time.sleep(0.2)
    for pid in alive:  # do not leave them to the next test
        os.killpg(pid, signal.SIGKILL)
    assert not alive, f"still running after `steprun start` was killed: {alive}"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone, but for its parent's wait
    except FileNotFoundError:
        return False


def test_steprun_start_runs_the_production_shape_with_unique_worker_names(procs: Procs, settings: Settings,
                                                                           tmp_path: Path) -> None:
    start, port, env = _steprun_start(procs, settings, tmp_path, workers=2, concurrency=5)
    names = set(re.findall(r"(steprun-worker\d+\.\d+@\S+) ready\.", start.log()))
    assert len(names) == 2, start.log()[-3000:]
    key = create_key_cli(env, f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}")
    done = run_turn(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}, "math", "add 2 3")
    assert done["status"] == "completed"
    children = [int(p) for p in re.findall(r"\(pid (\d+)\)", start.log())]
    assert len(children) == 4  # web, two workers, scheduler
    os.kill(start.popen.pid, signal.SIGTERM)
    start.popen.wait(timeout=60)
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _bench_leftovers(bench_pid: int) -> list[int]:
    """Processes whose environment names this bench run's queue (its workers, web, scheduler)."""
    marker = f"steprun-bench-{bench_pid}_".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == bench_pid:
            continue
        try:
            if marker in (entry / "environ").read_bytes() or marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_bench_cleans_up_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "bench.log", "wb")
    bench = subprocess.Popen([sys.executable, "-m", "bench", "--quick", "--no-docs", "--workers", "1",
                              "--admin-url", ADMIN_URL, "--redis-url", REDIS_URL],
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    admin = create_engine(ADMIN_URL.replace("postgresql://", "postgresql+psycopg2://"))
    pattern = f"steprun_bench_{bench.pid}_%"

    def databases() -> list[str]:
        with admin.connect() as conn:
            return [r[0] for r in conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE :p"),
                                               {"p": pattern})]

    try:
        deadline = time.time() + 90
        while not (databases() and len(_bench_leftovers(bench.pid)) >= 2) and time.time() < deadline:
            assert bench.poll() is None, (tmp_path / "bench.log").read_text()[-3000:]
            time.sleep(0.5)
        assert databases() and _bench_leftovers(bench.pid), "the bench never started its stack"
        bench.send_signal(signal.SIGTERM)
        bench.wait(timeout=90)
        assert databases() == []
        deadline = time.time() + 10
        while _bench_leftovers(bench.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert _bench_leftovers(bench.pid) == []
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in _bench_leftovers(bench.pid):
            os.kill(pid, signal.SIGKILL)
        admin.dispose()
        log.close()
