"""Load-generator processes, seen from the orchestrator; the progress line; small statistics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.stack import ROOT, cpu_seconds


class Loader:
    """One ``python -m bench.load`` process (own process group), fed one job on stdin."""

    running: set[Loader] = set()  # every generator not yet waited for, killed by kill_all() at exit

    @classmethod
    def kill_all(cls) -> None:
        for loader in list(cls.running):
            loader.kill()

    def __init__(self, job: dict[str, Any]):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen([sys.executable, "-m", "bench.load"], cwd=ROOT, env=env, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True)
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(job) + "\n")
        self.popen.stdin.close()
        self.progress: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self.stderr = ""
        Loader.running.add(self)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "progress" in msg:
                self.progress = msg["progress"]
            elif "result" in msg:
                self.result = msg["result"]

    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            if len(self.stderr) < 20_000:
                self.stderr += line

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
        self._reader.join(timeout=5)
        if self.result is None:
            raise RuntimeError(f"load generator gave no result:\n{self.stderr[-3000:]}")
        return self.result

    def release(self) -> None:
        """Tell the generator its scenario is done: it stops, reports and exits (bench/load.py RELEASE)."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGUSR1)

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=10)
        Loader.running.discard(self)


class Progress:
    """One status line, rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self._last = 0.0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            sys.stdout.write("\r\033[K" + text[:150])
            sys.stdout.flush()
        elif force or now - self._last >= 5.0:
            print(text, flush=True)
            self._last = now

    def done(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(text, flush=True)


def watch(loaders: list[Loader], until: float, label: str, progress: Progress,
          describe: Callable[[dict[str, float]], str], stop_when: Callable[[dict[str, float]], bool] | None = None,
          ) -> dict[str, float]:
    """Show summed progress until ``until`` (wall clock), every loader exits, or ``stop_when`` holds."""
    started = time.time()
    total: dict[str, float] = {}
    while time.time() < until and any(ld.popen.poll() is None for ld in loaders):
        total = sum_progress(loaders)
        progress.show(f"[{label}] {time.time() - started:5.1f}s  {describe(total)}")
        if stop_when is not None and stop_when(total):
            break
        time.sleep(0.5)
    return sum_progress(loaders)


def sum_progress(loaders: list[Loader]) -> dict[str, float]:
    total: dict[str, float] = {}
    for ld in loaders:
        for k, v in ld.progress.items():
            if isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
    return total


class CpuMeter:
    """CPU used by groups of processes, and by the whole machine, between start() and stop().

    A group is a function returning its pids, asked at both ends: a process that
    appeared in between (a new Postgres backend) counts from its birth; one that
    exited in between loses what it used (its CPU time is gone with it).
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]]):
        self.groups = groups

    def start(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._m0 = _machine_busy()
        self._c0 = {name: {p: _cpu(p) for p in pids()} for name, pids in self.groups.items()}
        return self

    def stop(self) -> dict[str, float]:
        """Percent of one core per group, machine busy percent (of all cores), and the rest ("other")."""
        elapsed = time.monotonic() - self._t0
        out = {}
        self.used: dict[str, float] = {}  # CPU-seconds per group, unrounded
        for name, pids in self.groups.items():
            used = sum(max(0.0, _cpu(p) - self._c0[name].get(p, 0.0)) for p in pids())
            self.used[name] = used
            out[f"{name}_cpu_pct"] = round(100 * used / elapsed, 1)
        busy, total = (a - b for a, b in zip(_machine_busy(), self._m0, strict=True))
        cores = os.cpu_count() or 1
        out["machine_busy_pct"] = round(100 * busy / total, 1) if total else 0.0
        # Everything else running on the machine (other users' processes), in percent of one core.
        ours = sum(v for k, v in out.items() if k.endswith("_cpu_pct"))
        out["other_cpu_pct"] = round(max(0.0, out["machine_busy_pct"] * cores - ours), 1)
        out["meter_seconds"] = round(elapsed, 1)
        return out


def _cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def _machine_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(round(q / 100 * len(ordered) + 0.4999)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"
