"""Interrupting a model call that blocks, from another thread.

Under the gevent worker a blocked step is interrupted in place (a greenlet
throw, shared/engine/watch.py). Threads cannot be thrown into, so in the
embedded mode (`steprun dev`) the step's watch aborts its :class:`CallScope`
instead: every socket a model opened inside the scope is shut down (a blocked
read returns at once), every wait in it wakes, and the model raises the error
the watch gave (the step's stop: time limit, cancel, shutdown) rather than
retrying.
"""
from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class CallScope:
    """What a step's model call may be interrupted through: its sockets and its waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._error: Callable[[], BaseException] | None = None
        self._aborted = threading.Event()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def abort(self, error: Callable[[], BaseException]) -> None:
        """Make the call raise ``error()``: its sockets are shut down, its waits return."""
        with self._lock:
            if self._error is None:
                self._error = error
            self._aborted.set()
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def check(self) -> None:
        """Raise the abort's error if the call was aborted."""
        if self._error is not None and self._aborted.is_set():
            raise self._error()

    def register(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.add(sock)
            aborted = self._aborted.is_set()
        if aborted:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def unregister(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.discard(sock)

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or until aborted (then raise)."""
        if seconds > 0:
            self._aborted.wait(seconds)
        self.check()


_SCOPE: ContextVar[CallScope | None] = ContextVar("steprun_model_call_scope", default=None)
# The scope used outside any step (a model called directly): never aborted.
_NEVER = CallScope()


def current_scope() -> CallScope:
    """The scope of the step running in this thread, or one that is never aborted."""
    return _SCOPE.get() or _NEVER


@contextmanager
def call_scope(scope: CallScope) -> Iterator[CallScope]:
    """Model calls made inside the block can be interrupted through ``scope``."""
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def interruptible_sleep(seconds: float) -> None:
    """``time.sleep`` that a step's stop cuts short (raising the stop)."""
    scope = _SCOPE.get()
    if scope is None:
        import time

        time.sleep(seconds)  # looked up per call: gevent's patched sleep where patched
        return
    scope.sleep(seconds)
