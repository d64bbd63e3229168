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
from typing import Any

from tests.support.loopback import Loopback


class CuttingRelay(Loopback):
    def __init__(self, target_port: int, cut_request: bytes = b"/runs/stream",
                 cut_marker: bytes = b"event: messages\n", cut_after: int = 2):
        self.cut_request, self.cut_marker, self.cut_after = cut_request, cut_marker, cut_after
        self.heads: list[bytes] = []
        self.cuts = 0
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", target_port), backlog=16)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connection_state(self) -> dict[str, Any]:
        return {"armed": False, "seen": 0}

    def forward(self, source: socket.socket, sink: socket.socket, state: Any, *, upstream: bool) -> None:
        source.settimeout(120)
        while data := source.recv(65536):
            if upstream:
                with self._lock:
                    self.heads.append(data[:2048])
                    if self.cuts == 0 and data.startswith(b"POST ") and self.cut_request in data.split(b"\r\n")[0]:
                        state["armed"] = True
            elif state["armed"]:
                before = int(state["seen"])
                state["seen"] = before + data.count(self.cut_marker)
                if int(state["seen"]) >= self.cut_after:
                    at = -1
                    for _ in range(self.cut_after - before):  # the cut_after-th marker overall
                        at = data.find(self.cut_marker, at + 1)
                    at += len(self.cut_marker) + 12  # mid-frame: the client holds half an event
                    sink.sendall(data[:at])
                    with self._lock:
                        self.cuts += 1
                    _reset(sink)
                    _reset(source)
                    return
            sink.sendall(data)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the peer sees a broken connection, not a clean end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # Wakes the other thread's recv() on this socket; close() alone would leave it blocked
        # (holding the socket open, so the RST would wait for its timeout).
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        sock.close()  # not loopback.close: its SHUT_WR would send a FIN before the reset
    except OSError:
        pass
