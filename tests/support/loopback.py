"""A loopback TCP listener that forwards each accepted connection to a target, two threads a connection.

The relays in tests/support (a Postgres transaction counter, a connection cutter)
differ only in what they do with the bytes on the way: they subclass
:class:`Loopback` and implement :meth:`Loopback.forward`.
"""
from __future__ import annotations

import socket
import threading
from typing import Any


class Loopback:
    """Listens on 127.0.0.1 (a free port) and hands each client, with a fresh upstream socket, to ``forward``."""

    def __init__(self, target: tuple[str, int], backlog: int = 64):
        self.target = target
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(backlog)
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()

    def connection_state(self) -> Any:
        """Per-connection state shared by its two directions (overridden by relays that need one)."""
        return None

    def forward(self, source: socket.socket, sink: socket.socket, state: Any, *, upstream: bool) -> None:
        """Copy ``source`` to ``sink`` until either ends; ``upstream``: client to target."""
        raise NotImplementedError

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:  # the 0.2 s accept timeout (TimeoutError is an OSError), or closed
                continue
            target = socket.create_connection(self.target, timeout=10)
            state = self.connection_state()
            threading.Thread(target=self._pipe, args=(client, target, state, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(target, client, state, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, state: Any, upstream: bool) -> None:
        try:
            self.forward(source, sink, state, upstream=upstream)
        except OSError:
            pass
        finally:
            close(sink)


def close(sock: socket.socket) -> None:
    """Shut both directions (waking a thread blocked in recv on it) and close; never raises."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
