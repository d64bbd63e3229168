"""py-spy profiles of the API and a worker while a scenario runs (``python -m bench --profile``).

py-spy samples from outside the process (no code change, little overhead).
Its ``raw`` output is collapsed stacks: ``frame;frame;...;frame count``. The
summary keeps where CPU time went: the frames that were on CPU themselves
(self) and the steprun functions under which it was spent (inclusive).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench.stack import BIN, Stack

FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
OURS = ("/api/", "/shared/", "/workers/", "/scheduler/")
KEEP = Path(tempfile.gettempdir()) / "steprun-bench-profiles"


class Profiler:
    def __init__(self, stack: Stack, label: str, seconds: float):
        self.stack, self.label, self.seconds = stack, label, int(seconds) + 1
        self.targets = {"api": stack.api_pid()}
        if stack.workers:
            self.targets["worker"] = stack.workers[0].pid
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def __enter__(self) -> Profiler:
        exe = shutil.which("py-spy") or str(BIN / "py-spy")
        for name, pid in self.targets.items():
            out = self.stack.tmp / f"profile-{self.label}-{name}.txt"
            cmd = [exe, "record", "--format", "raw", "--nonblocking", "--rate", "200", "-d", str(self.seconds),
                   "-p", str(pid), "-o", str(out)]
            self.procs[name] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def summaries(self, top: int = 12) -> list[dict[str, Any]]:
        out = []
        for name, (proc, path) in self.procs.items():
            if not path.exists():
                err = proc.stderr.read().decode(errors="replace")[-500:] if proc.stderr else ""
                out.append(dict(label=self.label, process=name, error=err or "no profile written"))
                continue
            out.append(dict(label=self.label, process=name, **summarize(path.read_text(), top)))
            # Kept after the run (the run's temp folder is removed): feed it to a flame graph tool.
            KEEP.mkdir(exist_ok=True)
            shutil.copy(path, KEEP / path.name)
            out[-1]["raw"] = str(KEEP / path.name)
        return out


def _short(frame: str) -> str:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        for marker in OURS:
            if marker in path:
                path = marker.strip("/") + "/" + path.split(marker, 1)[1]
                break
    return f"{m.group('fn')} ({path})"


def summarize(raw: str, top: int = 12) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        self_time[_short(frames[-1])] += n
        for f in {_short(f) for f in frames if "site-packages" not in f and "/lib/python3" not in f}:
            if f.split(" (", 1)[-1].startswith(tuple(o.strip("/") + "/" for o in OURS)):
                ours[f] += n
    pct = (lambda c: [(f, round(100 * n / total, 1)) for f, n in c.most_common(top)]) if total else (lambda c: [])
    return dict(samples=total, self_top=pct(self_time), ours_inclusive=pct(ours))
