"""A loopback TCP relay in front of Postgres that counts the transactions passing through it.

Each process under test gets its own relay (its DATABASE_URL points at the
relay's port), so the count is that process's own, exact, and immediate (the
server's ``pg_stat_database`` is flushed by each backend on its own schedule).
The relay reads the server's ReadyForQuery messages: their status byte says
whether the connection is idle (``I``), in a transaction (``T``) or in a failed
one (``E``). A transaction ended each time a connection went from ``T``/``E``
back to ``I``, or answered a query while staying ``I`` (a statement run in
autocommit, a transaction of its own) — what Postgres counts in
``xact_commit + xact_rollback``. Queries (``Q`` messages) are counted too: each
is a round trip.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tests.support.loopback import Loopback

# SSLRequest and GSSENCRequest: answered by the server with one unframed byte ('N' or 'S'/'G').
_NEGOTIATION_CODES = {80877103, 80877104}


class PgCounter(Loopback):
    def __init__(self, database_url: str):
        parts = urlsplit(database_url)
        self.transactions = 0
        # Transactions a connection runs for itself, not for any request: its opening check
        # (``steprun_open()``) and the ping after it sat idle. Counted apart: per connection, not per turn.
        self.upkeep = 0
        self.queries = 0
        # Each ended transaction's statements (their first 160 characters), for a failure's message.
        self.log: list[list[str]] = []
        self._lock = threading.Lock()
        self._last_activity = time.monotonic()
        super().__init__((parts.hostname or "127.0.0.1", parts.port or 5432))
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        self.url = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.transactions, self.queries

    def settle(self, quiet: float = 1.0, timeout: float = 15.0) -> tuple[int, int]:
        """The counts once nothing has passed for ``quiet`` seconds (background work done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                idle = time.monotonic() - self._last_activity
            if idle >= quiet:
                break
            time.sleep(0.1)
        return self.counts()

    def since(self, n: int) -> str:
        """Transactions ``n`` onwards, one line each: what ran in them."""
        with self._lock:
            return "\n".join(f"  {i}: " + " | ".join(t) for i, t in enumerate(self.log[n:], n))

    def connection_state(self) -> dict[str, Any]:
        return {"negotiations": 0, "pending_queries": 0, "status": None, "statements": []}

    def forward(self, source: socket.socket, sink: socket.socket, state: Any, *, upstream: bool) -> None:
        buf = b""
        started = not upstream  # the client's startup message (untyped) is yet to pass
        while data := source.recv(65536):
            with self._lock:
                self._last_activity = time.monotonic()
            buf += data
            while True:
                if not started:  # client to server: the untyped startup (or SSL/GSS negotiation) message
                    if len(buf) < 8 or len(buf) < struct.unpack("!i", buf[:4])[0]:
                        break
                    length, code = struct.unpack("!ii", buf[:8])
                    if code in _NEGOTIATION_CODES:
                        state["negotiations"] += 1
                    else:
                        started = True
                    sink.sendall(buf[:length])
                    buf = buf[length:]
                    continue
                if not upstream and state["negotiations"] and buf:
                    state["negotiations"] -= 1  # the one-byte answer to SSLRequest / GSSENCRequest
                    sink.sendall(buf[:1])
                    buf = buf[1:]
                    continue
                if len(buf) < 5 or len(buf) < 1 + struct.unpack("!i", buf[1:5])[0]:
                    break
                length = 1 + struct.unpack("!i", buf[1:5])[0]
                if upstream and buf[:1] == b"Q":
                    with self._lock:
                        self.queries += 1
                        state["pending_queries"] += 1
                        state["statements"].append(buf[5:165].decode(errors="replace").rstrip("\x00"))
                elif not upstream and buf[:1] == b"Z":
                    self._ready(state, buf[5:6])
                sink.sendall(buf[:length])
                buf = buf[length:]

    def _ready(self, conn: dict[str, Any], status: bytes) -> None:
        with self._lock:
            before, conn["status"] = conn["status"], status
            ran = conn["pending_queries"] > 0
            conn["pending_queries"] = 0
            if status == b"I" and (before in (b"T", b"E") or (before == b"I" and ran)):
                if _connection_upkeep(conn["statements"]):
                    self.upkeep += 1
                else:
                    self.transactions += 1
                    self.log.append(conn["statements"])
            if status == b"I":
                conn["statements"] = []


def _connection_upkeep(statements: list[str]) -> bool:
    body = [st.strip() for st in statements if st.strip().upper() not in ("BEGIN", "COMMIT", "ROLLBACK")]
    return bool(body) and (body[0].startswith("SELECT steprun_open()") or body == ["SELECT 1"])
