"""gunicorn settings for the web process (gevent workers)."""
import os

worker_class = "gevent"
# Each open WebSocket/SSE stream holds one "connection"; the default 1000 caps streams per process.
worker_connections = int(os.environ.get("STEPRUN_WORKER_CONNECTIONS", "5000"))
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
# Longer than a load balancer's idle timeout, so the balancer closes first.
keepalive = 95
# gunicorn's largest request line (default 4094): long search queries and cursors then reach
# the app, which answers a JSON 400 naming the field instead of gunicorn's HTML 414.
limit_request_line = 8190
graceful_timeout = 25
timeout = 60


def post_fork(server, worker):  # noqa: ARG001 - gunicorn's hook signature
    # psycopg2 must yield to gevent, or one slow query stalls every request of the worker.
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()


def child_exit(server, worker):  # noqa: ARG001 - gunicorn's hook signature
    # With PROMETHEUS_MULTIPROC_DIR (several workers summed by /metrics), a dead
    # worker's live gauges (open streams) must stop counting.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
