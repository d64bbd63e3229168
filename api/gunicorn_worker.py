"""The web process's gunicorn worker: gunicorn's gevent worker with bounded request reading.

gunicorn bounds the wait for a request's head only by ``keepalive`` (95 s here),
and a request's body not at all: a client sending one header line every few
seconds, or a body a byte at a time, held a connection (and its greenlet) for
as long as it liked. This worker adds two deadlines:

- **head**: once the first byte of a request has arrived, its request line and
  headers must be complete within STEPRUN_HEADER_TIMEOUT, or the connection is
  closed. The wait *before* that first byte (an idle keep-alive connection) is
  still ``keepalive``, longer than a load balancer's idle timeout.
- **body**: the body must be read within STEPRUN_BODY_TIMEOUT of the head's end.
  A read past it raises :class:`~shared.errors.RequestTimeout` in the app (a 408
  with the error envelope), and the connection is closed afterwards; a body the
  app never read is drained under the same deadline, or the connection is closed.

A WebSocket's frames are read from the socket directly, not through the body,
so neither deadline applies to an upgraded connection. Production deployments
should still put a buffering proxy in front (infra/nginx): it absorbs slow
clients before they reach a worker at all.
"""
from __future__ import annotations

import time
from typing import Any

import gevent
from gevent.hub import get_hub
from gunicorn.workers.ggevent import GeventWorker

from shared.errors import RequestTimeout
from shared.settings import Settings


class RequestHeadTimeout(gevent.Timeout):
    """gunicorn's keep-alive timeout, which becomes the head deadline when the request's first byte arrives.

    Silent (``exception=False``) like gunicorn's own: when it fires, the parser's
    wait ends and gunicorn closes the connection without a response.
    """

    def __init__(self, idle: float, head: float, fileno: int | None, on_expired: Any = None):
        super().__init__(idle, False)
        self.head, self.fileno, self.on_expired = head, fileno, on_expired
        self._watcher: Any = None
        self._target: Any = None
        self.reading = False  # the request's first byte has arrived: the head deadline runs

    def start(self) -> None:
        super().start()
        if self.fileno is None or self.head <= 0:
            return
        self._target = gevent.getcurrent()
        self._watcher = get_hub().loop.io(self.fileno, 1)  # 1: readable
        self._watcher.start(self._first_byte)

    def _first_byte(self) -> None:
        self._stop_watching()
        if not self.pending:
            return
        self.reading = True
        idle: Any = getattr(self, "timer")  # noqa: B009 - gevent's attribute, untyped
        idle.stop()
        idle.close()
        self.timer = get_hub().loop.timer(self.head, ref=True, priority=-1)
        self.timer.start(self._on_expiration, self._target, self, update=True)

    def _on_expiration(self, prev_greenlet: Any, ex: Any) -> None:
        if self.reading and self.on_expired is not None:
            self.on_expired()
        super()._on_expiration(prev_greenlet, ex)

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None

    def cancel(self) -> None:
        self._stop_watching()
        super().cancel()

    def close(self) -> None:
        self._stop_watching()
        super().close()


class DeadlineBody:
    """A request's body (gunicorn's ``Body``) whose every read must end by ``deadline`` (time.monotonic())."""

    def __init__(self, body: Any, deadline: float, seconds: float):
        self.body, self.deadline, self.seconds = body, deadline, seconds

    @property
    def failed(self) -> bool:
        return bool(getattr(self.body, "failed", False))

    @failed.setter
    def failed(self, value: bool) -> None:
        self.body.failed = value

    def _bounded(self, method: str, *args: Any) -> Any:
        remaining = self.deadline - time.monotonic()
        error = RequestTimeout(f"the request body was not received within {self.seconds:g} s "
                               "(STEPRUN_BODY_TIMEOUT)")
        if remaining <= 0:
            self.body.failed = True  # where the next request would start is unknown: the connection closes
            raise error
        try:
            with gevent.Timeout(remaining, error):
                return getattr(self.body, method)(*args)
        except RequestTimeout:
            self.body.failed = True
            raise

    def read(self, size: int | None = None) -> bytes:
        return self._bounded("read", size)

    def readline(self, size: int | None = None) -> bytes:
        return self._bounded("readline", size)

    def readlines(self, size: int | None = None) -> list[bytes]:
        return self._bounded("readlines", size)

    def __iter__(self) -> DeadlineBody:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self.body, name)


class SteprunGeventWorker(GeventWorker):
    """gunicorn's gevent worker, with the head and body deadlines above (api/gunicorn_conf.py selects it)."""

    def init_process(self) -> None:
        settings = Settings.from_env()
        self.header_timeout = max(0.0, settings.header_timeout)
        self.body_timeout = max(0.0, settings.body_timeout)
        # Each connection's handler greenlet -> its client socket, for the head deadline's first-byte watch.
        self._clients: dict[Any, Any] = {}
        super().init_process()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        current = gevent.getcurrent()
        self._clients[current] = (client, addr)
        try:
            super().handle(listener, client, addr)
        finally:
            self._clients.pop(current, None)

    def timeout_ctx(self) -> gevent.Timeout:
        client, addr = self._clients.get(gevent.getcurrent(), (None, None))
        try:
            fileno = client.fileno() if client is not None else None
        except OSError:
            fileno = None

        def expired() -> None:
            self.log.info("closing a connection from %s: its request head took longer than %g s "
                          "(STEPRUN_HEADER_TIMEOUT)", addr[0] if addr else "?", self.header_timeout)

        return RequestHeadTimeout(self.cfg.keepalive, self.header_timeout, fileno, expired)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool:
        if self.body_timeout and getattr(req, "body", None) is not None:
            req.body = DeadlineBody(req.body, time.monotonic() + self.body_timeout, self.body_timeout)
        return super().handle_request(listener_name, req, sock, addr)
