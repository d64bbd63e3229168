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
from urllib.parse import urlsplit, urlunsplit

# SSLRequest and GSSENCRequest: answered by the server with one unframed byte ('N' or 'S'/'G').
_NEGOTIATION_CODES = {80877103, 80877104}


class PgCounter:
    def __init__(self, database_url: str):
        parts = urlsplit(database_url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.transactions = 0
        self.queries = 0
        # Each ended transaction's statements (their first 160 characters), for a failure's message.
        self.log: list[list[str]] = []
        self._lock = threading.Lock()
        self._last_activity = time.monotonic()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        self.url = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

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

    def close(self) -> None:
        self._stop.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            upstream = socket.create_connection(self.target, timeout=10)
            conn = {"negotiations": 0, "pending_queries": 0, "status": None, "statements": []}
            threading.Thread(target=self._up, args=(client, upstream, conn), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, conn), daemon=True).start()

    def _touch(self) -> None:
        with self._lock:
            self._last_activity = time.monotonic()

    def _up(self, client: socket.socket, upstream: socket.socket, conn: dict) -> None:
        buf = b""
        started = False  # the startup message (untyped) has been seen
        try:
            while data := client.recv(65536):
                self._touch()
                buf += data
                while True:
                    if not started:
                        if len(buf) < 8:
                            break
                        length, code = struct.unpack("!ii", buf[:8])
                        if len(buf) < length:
                            break
                        if code in _NEGOTIATION_CODES:
                            conn["negotiations"] += 1
                        else:
                            started = True
                        upstream.sendall(buf[:length])
                        buf = buf[length:]
                        continue
                    if len(buf) < 5:
                        break
                    length = struct.unpack("!i", buf[1:5])[0]
                    if len(buf) < 1 + length:
                        break
                    if buf[:1] == b"Q":
                        with self._lock:
                            self.queries += 1
                            conn["pending_queries"] += 1
                            conn["statements"].append(buf[5:165].decode(errors="replace").rstrip("\x00"))
                    upstream.sendall(buf[:1 + length])
                    buf = buf[1 + length:]
        except OSError:
            pass
        finally:
            _close(upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, conn: dict) -> None:
        buf = b""
        try:
            while data := upstream.recv(65536):
                self._touch()
                buf += data
                while True:
                    if conn["negotiations"] and buf:
                        conn["negotiations"] -= 1  # the one-byte answer to SSLRequest / GSSENCRequest
                        client.sendall(buf[:1])
                        buf = buf[1:]
                        continue
                    if len(buf) < 5:
                        break
                    length = struct.unpack("!i", buf[1:5])[0]
                    if len(buf) < 1 + length:
                        break
                    if buf[:1] == b"Z":
                        self._ready(conn, buf[5:6])
                    client.sendall(buf[:1 + length])
                    buf = buf[1 + length:]
                if buf and not conn["negotiations"]:
                    continue
        except OSError:
            pass
        finally:
            _close(client)

    def _ready(self, conn: dict, status: bytes) -> None:
        with self._lock:
            before, conn["status"] = conn["status"], status
            ran = conn["pending_queries"] > 0
            conn["pending_queries"] = 0
            if status == b"I" and (before in (b"T", b"E") or (before == b"I" and ran)):
                self.transactions += 1
                self.log.append(conn["statements"])
            if status == b"I":
                conn["statements"] = []


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
