"""A loopback TCP relay that cuts one streaming response in the middle, as a flaky network or proxy would.

Every connection is forwarded to the target port both ways. The first request
that matches ``cut_request`` (e.g. ``POST …/runs/stream``) has its response
cut (TCP reset, mid-frame) once ``cut_marker`` has passed ``cut_after`` times;
later connections pass untouched, so what resumes the stream is the client's
own reconnect. Every request head is recorded, to see how the client came back.
"""
from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class CuttingRelay:
    target_port: int
    cut_request: bytes = b"/runs/stream"
    cut_marker: bytes = b"event: messages\n"
    cut_after: int = 2
    heads: list[bytes] = field(default_factory=list)
    cuts: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:  # the 0.2 s accept timeout (TimeoutError is an OSError), or closed
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            state = {"armed": False, "seen": 0}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, state: dict[str, object]) -> None:
        client.settimeout(120)
        try:
            while data := client.recv(65536):
                with self._lock:
                    self.heads.append(data[:2048])
                    if self.cuts == 0 and data.startswith(b"POST ") and self.cut_request in data.split(b"\r\n")[0]:
                        state["armed"] = True
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, state: dict[str, object]) -> None:
        upstream.settimeout(120)
        try:
            while data := upstream.recv(65536):
                if state["armed"]:
                    before = int(state["seen"])  # type: ignore[call-overload]
                    state["seen"] = before + data.count(self.cut_marker)
                    if int(state["seen"]) >= self.cut_after:  # type: ignore[call-overload]
                        at = -1
                        for _ in range(self.cut_after - before):  # the cut_after-th marker overall
                            at = data.find(self.cut_marker, at + 1)
                        at += len(self.cut_marker) + 12  # mid-frame: the client holds half an event
                        client.sendall(data[:at])
                        with self._lock:
                            self.cuts += 1
                        _reset(client)
                        _reset(upstream)
                        return
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the peer sees a broken connection, not a clean end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # Wakes the other thread's recv() on this socket; close() alone would leave it blocked
        # (holding the socket open, so the RST would wait for its timeout).
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
