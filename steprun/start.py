"""`steprun start`: the Procfile's processes on one machine, under a small process manager.

Unlike ``honcho start`` on the Procfile, it runs the migration once before the
processes (the Procfile's ``release:`` exits at once, and honcho stops every
process when one exits), needs no virtualenv on PATH (each command is the
interpreter's own sibling script), and names every Celery worker uniquely.
"""
from __future__ import annotations

import ctypes
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.settings import Settings

STOP_GRACE = 30.0  # seconds each process gets after SIGTERM before SIGKILL (a worker's own grace is 20 s)


def _bin(name: str) -> str:
    """The console script installed beside this interpreter (the venv's), else whatever PATH finds."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _dies_with(parent: int) -> None:
    """A child's last act before its exec (Linux): SIGTERM when this process manager dies, SIGKILL included,
    so no process outlives it to serve on alone (each runs in a session of its own, out of reach of a
    signal to ours)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def commands(settings: Settings, *, workers: int, web_workers: int | None) -> list[tuple[str, list[str]]]:
    """(name, argv) of each process, as the Procfile runs them."""
    web = [_bin("gunicorn"), "api.wsgi:app", "-c", "python:api.gunicorn_conf", "-b", f"0.0.0.0:{settings.port}"]
    if web_workers:
        web += ["-w", str(web_workers)]
    procs = [("web", web)]
    for i in range(1, workers + 1):
        # Unique node names: two workers both called celery@host confuse Celery's control and logs.
        procs.append((f"worker.{i}", [
            _bin("celery"), "-A", "workers.celery_app", "worker", "-P", "gevent",
            "-n", f"steprun-worker{i}.{os.getpid()}@%h", "-c", str(settings.worker_concurrency),
            "-Q", settings.queue_name, "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"]))
    procs.append(("scheduler", [sys.executable, "-m", "scheduler"]))
    return procs


def run_processes(settings: Settings, *, workers: int = 1, web_workers: int | None = None,
                  migrate: bool = True) -> int:
    """Start every process; return when one exits or on SIGINT/SIGTERM, after stopping them all."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    cwd = os.getcwd()
    # Agent modules (STEPRUN_AGENTS) resolve from here in every process, as in `steprun dev`.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, env.get("PYTHONPATH", "")) if p)
    if migrate:
        done = subprocess.run([sys.executable, "-m", "steprun", "migrate"], env=env, cwd=cwd)
        if done.returncode:
            return done.returncode
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    width = max(len(name) for name, _ in commands(settings, workers=workers, web_workers=web_workers))
    sel = selectors.DefaultSelector()
    running: dict[str, subprocess.Popen[bytes]] = {}
    me = os.getpid()
    dies_with = (lambda: _dies_with(me)) if sys.platform.startswith("linux") else None
    for name, argv in commands(settings, workers=workers, web_workers=web_workers):
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=dies_with)
        running[name] = proc
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        sel.register(proc.stdout, selectors.EVENT_READ, name)
        _say(width, "start", f"{name}: {' '.join(argv)} (pid {proc.pid})")
    status = 0
    partial: dict[str, bytes] = {}
    try:
        while not stopping:
            for key, _ in sel.select(timeout=0.5):
                _pump(key, sel, width, partial)
            exited = [(n, p.returncode) for n, p in running.items() if p.poll() is not None]
            if exited:
                name, code = exited[0]
                _say(width, "start", f"{name} exited with {code}: stopping the others")
                status = code or 1
                break
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc in running.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while any(p.poll() is None for p in running.values()) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.2):
                _pump(key, sel, width, partial)
        for name, proc in running.items():
            if proc.poll() is None:
                _say(width, "start", f"{name} did not stop within {STOP_GRACE:g}s: killed")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    return status


def _pump(key: selectors.SelectorKey, sel: selectors.BaseSelector, width: int, partial: dict[str, bytes]) -> None:
    name = key.data
    try:
        data = os.read(key.fd, 65536)
    except BlockingIOError:
        return
    if not data:
        sel.unregister(key.fileobj)
        if partial.get(name):
            _say(width, name, partial.pop(name).decode(errors="replace"))
        return
    lines = (partial.pop(name, b"") + data).split(b"\n")
    partial[name] = lines.pop()
    for line in lines:
        _say(width, name, line.decode(errors="replace"))


def _say(width: int, name: str, text: str) -> None:
    sys.stdout.write(f"{name:<{width}} | {text}\n")
    sys.stdout.flush()
