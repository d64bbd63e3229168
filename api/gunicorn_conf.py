"""gunicorn settings for the web process (gevent workers)."""
import os

worker_class = "gevent"
# Each open WebSocket/SSE stream holds one "connection"; the default 1000 caps streams per process.
worker_connections = int(os.environ.get("STEPRUN_WORKER_CONNECTIONS", "5000"))
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
# Longer than a load balancer's idle timeout, so the balancer closes first.
keepalive = 95
graceful_timeout = 25
timeout = 60


def post_fork(server, worker):  # noqa: ARG001 - gunicorn's hook signature
    # psycopg2 must yield to gevent, or one slow query stalls every request of the worker.
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()
