"""The Procfile's gunicorn settings plus one proposed fix, for a labelled what-if run.

``python -m bench --whatif-redis-pool N`` starts `web` with
``-c python:bench.gunicorn_whatif`` instead of ``python:api.gunicorn_conf``:
everything the same, except that the API process's Redis client gets a
*blocking* pool of N connections. redis-py 8 defaults to a non-blocking pool
of 100 that raises ``MaxConnectionsError`` the moment a 101st greenlet wants a
connection, which the relay reports as "the event log is unreadable"
(docs/benchmarks.md, hot spots). The proposed fix in shared/runtime.py is the
same two keyword arguments (see the report). Never used by the default run.
"""
import os

from api.gunicorn_conf import *  # noqa: F403 - the Procfile's settings, unchanged
from api.gunicorn_conf import post_fork as _procfile_post_fork


def post_fork(server, worker):  # type: ignore[no-untyped-def]
    _procfile_post_fork(server, worker)
    import redis

    size = int(os.environ.get("BENCH_WHATIF_REDIS_POOL", "50"))

    def from_url(url, **kwargs):  # type: ignore[no-untyped-def]
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=size, timeout=10, **kwargs)
        client = redis.Redis(connection_pool=pool)
        client.auto_close_connection_pool = True
        return client

    redis.Redis.from_url = from_url
