"""gunicorn settings for the web process (gevent workers)."""
import os
from typing import Any

# gunicorn's gevent worker, with a deadline on each request's head and body (STEPRUN_HEADER_TIMEOUT,
# STEPRUN_BODY_TIMEOUT): see api/gunicorn_worker.py.
worker_class = "api.gunicorn_worker.SteprunGeventWorker"
# Each open WebSocket/SSE stream holds one "connection"; the default 1000 caps streams per process.
worker_connections = int(os.environ.get("STEPRUN_WORKER_CONNECTIONS", "5000"))
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
# Longer than a load balancer's idle timeout, so the balancer closes first. It bounds only the wait for a
# request's first byte; the rest of its head must follow within STEPRUN_HEADER_TIMEOUT.
keepalive = 95
# gunicorn's largest request line (default 4094): long search queries and cursors then reach
# the app, which answers a JSON 400 naming the field instead of gunicorn's HTML 414.
limit_request_line = 8190
# Long requests (?wait=) may finish within this after SIGTERM; streams and idle keep-alive connections
# do not wait for it (see post_worker_init): the process exits within a few seconds.
graceful_timeout = 25
timeout = 60
# After SIGTERM: streams are closed at once; whatever is still open this many seconds later is cut.
STREAM_CLOSE_GRACE = float(os.environ.get("STEPRUN_WEB_SHUTDOWN_SECONDS", "3"))


def on_starting(server):  # noqa: ARG001 - gunicorn's hook signature
    # The master refuses a half-configured deployment before it forks a worker (one line, exit 3).
    from shared.settings import deployment_settings

    deployment_settings("web")


# Requests in flight in this worker, so a timeout kill can say which ones it dropped.
_in_flight: dict[int, tuple[float, str, str]] = {}


def post_fork(server, worker):  # noqa: ARG001 - gunicorn's hook signature
    # psycopg2 must yield to gevent, or one slow query stalls every request of the worker.
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()


def pre_request(worker, req):  # noqa: ARG001 - gunicorn's hook signature
    import time

    _in_flight[id(req)] = (time.monotonic(), req.method, req.path)


def post_request(worker, req, environ, resp):  # noqa: ARG001 - gunicorn's hook signature
    _in_flight.pop(id(req), None)


def worker_abort(worker):
    # The arbiter kills a worker whose event loop was blocked past `timeout`: name the requests it held,
    # oldest first, so the one that blocked it can be found.
    import time

    now = time.monotonic()
    held = sorted(_in_flight.values())
    worker.log.error("worker %s timed out with %d request(s) in flight", worker.pid, len(held))
    for started, method, path in held[:20]:
        worker.log.error("  in flight %.1fs: %s %s", now - started, method, path.encode("unicode_escape").decode())


def child_exit(server, worker):  # noqa: ARG001 - gunicorn's hook signature
    # With PROMETHEUS_MULTIPROC_DIR (several workers summed by /metrics), a dead
    # worker's live gauges (open streams) must stop counting.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    """SIGTERM: stop accepting, close streams with a code and their cursor, drop idle keep-alives, exit.

    gunicorn's gevent worker waits up to graceful_timeout for every connection, and an idle
    keep-alive or a stream never ends by itself. Here every connection's wait between two
    requests is tracked: on SIGTERM the WebSockets are closed with 1012 (service restart) and
    the cursor, SSE streams end with an ``error`` event ``server_restart`` carrying the cursor,
    idle keep-alive connections are ended as if their keep-alive timed out, and a connection
    whose request ends after SIGTERM is closed (gunicorn also answers it ``Connection: close``).
    Clients reconnect to another process.
    """
    import socket

    import gevent

    # Connections waiting for their next request: handler greenlet -> the keep-alive Timeout it waits in.
    waiting: dict[Any, Any] = {}
    timeout_ctx, handle_request, handle_exit = worker.timeout_ctx, worker.handle_request, worker.handle_exit

    def tracked_timeout():
        timeout = timeout_ctx()
        waiting[gevent.getcurrent()] = timeout
        return timeout

    def tracked_request(listener_name, req, sock, addr):
        waiting.pop(gevent.getcurrent(), None)
        try:
            return handle_request(listener_name, req, sock, addr)
        finally:
            if not worker.alive:
                # Shutting down: this connection serves no further request (an upgraded WebSocket's
                # socket included, whose client may not have answered the close frame yet).
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def end_idle():
        for greenlet, timeout in list(waiting.items()):
            waiting.pop(greenlet, None)
            if not greenlet.dead:
                # Raised where the handler waits for the next request: gunicorn takes it for the
                # keep-alive timeout and closes the connection quietly.
                greenlet.kill(timeout, block=False)

    def stop_connections():
        from api.streaming import close_streams_for_restart

        closed = close_streams_for_restart(worker.wsgi)
        worker.log.info("SIGTERM: closing %d stream(s) and %d idle connection(s)", closed, len(waiting))
        end_idle()
        gevent.sleep(STREAM_CLOSE_GRACE)
        end_idle()

    def on_exit(sig, frame):
        first = worker.alive
        handle_exit(sig, frame)
        if first:
            gevent.spawn(stop_connections)

    worker.timeout_ctx, worker.handle_request, worker.handle_exit = tracked_timeout, tracked_request, on_exit
    import signal

    signal.signal(signal.SIGTERM, on_exit)
