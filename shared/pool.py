"""The connection pool: SQLAlchemy's QueuePool, but a burst's extra connections stay while the burst lasts.

A plain QueuePool closes an overflow connection the moment it is returned while
``pool_size`` others sit idle. Under a load that hovers around ``pool_size``
busy connections (an API process at a few dozen requests in flight, a worker
running steps and heartbeats) that is a new connection every few turns: a
backend started, a login, ``steprun_open()`` creating the connection's scope
store, then all of it torn down again. Measured with the bench's cost scenario
(16 users), the API process opened 52 connections in 40 seconds that way.

Here the extra connections go back to the pool like the others, and are closed
only once the pool has not needed more than ``pool_size`` at once for
:data:`OVERFLOW_LINGER_SECONDS`. The most recently returned connection is handed
out first (LIFO), so after a burst the extras are the ones left idle, and they
are closed as they come back. The limits do not change: never more than
``pool_size + max_overflow`` connections, and ``pool_size`` kept once quiet.
"""
from __future__ import annotations

import time
from typing import Any

from sqlalchemy.pool import ConnectionPoolEntry, QueuePool

# How long a pool keeps more than pool_size connections after it last had more than pool_size checked out.
OVERFLOW_LINGER_SECONDS = 60.0


class LingeringQueuePool(QueuePool):
    def __init__(self, creator: Any, pool_size: int = 5, max_overflow: int = 10, **kw: Any):
        # Room in the queue for every connection the pool may open: returning one never has to close it.
        kw["use_lifo"] = True
        super().__init__(creator, pool_size=pool_size + max(max_overflow, 0), max_overflow=0, **kw)
        self.keep = pool_size
        self.linger = OVERFLOW_LINGER_SECONDS
        self._busy_at = float("-inf")  # when more than `keep` were last checked out at once

    def _do_get(self) -> ConnectionPoolEntry:
        record = super()._do_get()
        if self.checkedout() > self.keep:
            self._busy_at = time.monotonic()
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        if self._pool.qsize() >= self.keep and time.monotonic() - self._busy_at > self.linger:
            try:
                record.close()  # quiet for a while and `keep` already idle: this one is a past burst's
            finally:
                self._dec_overflow()
            return
        super()._do_return_conn(record)

    def recreate(self) -> LingeringQueuePool:
        pool = super().recreate()  # the queue's full size, no overflow: restore what this pool keeps
        assert isinstance(pool, LingeringQueuePool)
        pool.keep, pool.linger = self.keep, self.linger
        return pool

    def status(self) -> str:
        return f"{super().status()} Kept when quiet: {self.keep}"
