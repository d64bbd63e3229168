"""A private redis-server whose commands are counted: per command (``INFO commandstats``) and per process.

``INFO commandstats`` counts every command the server ran, the ones a Lua script
runs included (an ``EVALSHA`` that EXPIREs four keys is five commands), and the
server is the test's alone, so the counts are exact. ``MONITOR`` records the same
commands with the client that sent them (a script's inner commands are marked
``lua``, after their ``EVALSHA``), which :meth:`PrivateRedis.who` maps to the
process holding that client's socket: a failure says which process sent what.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

_MONITOR_LINE = re.compile(r'^[\d.]+ \[\d+ (?P<client>[^\]]+)\] "(?P<cmd>[^"]+)"')


@dataclass
class Command:
    client: str  # "127.0.0.1:port", or "lua" for a command a script ran
    name: str
    line: str


@dataclass
class PrivateRedis:
    log_dir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    monitored: list[Command] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: redis.Redis | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        log = open(self.log_dir / "redis.log", "wb")
        self.proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                                      "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        threading.Thread(target=self._monitor, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def _monitor(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=None)  # MONITOR reads for as long as it runs
        with client.monitor() as m:
            for raw in m.listen():
                line = f'{raw["time"]} [{raw["db"]} {raw["client_address"]}:{raw["client_port"]}] "{raw["command"]}"'
                if raw.get("client_type") == "lua":
                    client_name = "lua"
                else:
                    client_name = f'{raw["client_address"]}:{raw["client_port"]}'
                name = (raw["command"].split(" ", 1)[0] or "?").lower()
                with self._lock:
                    self.monitored.append(Command(client_name, name, line))

    def commandstats(self) -> Counter[str]:
        if self._client is None:  # one connection for every read: its HELLO is not counted in a window
            self._client = redis.Redis.from_url(self.url)
        stats = self._client.info("commandstats")
        counts: Counter[str] = Counter()
        for name, v in stats.items():
            if name.removeprefix("cmdstat_") not in ("info", "monitor"):
                counts[name.removeprefix("cmdstat_")] = int(v["calls"])
        return counts

    def settle(self, quiet: float = 1.0, timeout: float = 20.0) -> tuple[Counter[str], int]:
        """commandstats and the MONITOR position once only idle polling has run for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        last, since = self._busy_mark(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            mark = self._busy_mark()
            if mark != last:
                last, since = mark, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        with self._lock:
            return self.commandstats(), len(self.monitored)

    def _busy_mark(self) -> int:
        """How many non-idle commands MONITOR has seen (a consumer's empty BRPOP is idle polling)."""
        with self._lock:
            return sum(1 for c in self.monitored if c.name not in IDLE_COMMANDS)

    def since(self, mark: int) -> list[Command]:
        with self._lock:
            return list(self.monitored[mark:])


# Commands a process sends while nothing happens: the consumer's blocking read, timing out and re-sent.
IDLE_COMMANDS = frozenset({"brpop"})


def socket_owners(pids: list[int]) -> dict[int, int]:
    """Local TCP port -> pid, for the sockets of ``pids``."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    ports: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[9] in inodes:
                ports[int(cols[1].rsplit(":", 1)[1], 16)] = inodes[cols[9]]
    return ports


def group_pids(pgid: int) -> list[int]:
    """Every process of the process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def by_process(commands: list[Command], owners: dict[int, str]) -> dict[str, Counter[str]]:
    """Commands per process name (``owners``: local port -> name); a script's inner commands go with
    the process that ran the script (MONITOR lists them right after its EVALSHA)."""
    out: dict[str, Counter[str]] = {}
    last = "?"
    for c in commands:
        if c.client != "lua":
            last = owners.get(int(c.client.rsplit(":", 1)[1]), c.client)
        out.setdefault(last, Counter())[c.name] += 1
    return out
