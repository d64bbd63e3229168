"""What the servers did during a measured window: Postgres transactions and statements, Redis commands.

Postgres counts come from ``pg_stat_database`` for the run's own database, so
they are exact. Redis counts come from ``INFO commandstats``, which covers the
whole server: other users of the same Redis add to them (the docs say so).
``usec`` is Redis's own time inside each command, the figure that bounds a
single-threaded Redis.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import text

from bench.stack import Stack

PG_FIELDS = ("xact_commit", "xact_rollback", "tup_returned", "tup_fetched", "tup_inserted", "tup_updated")


class ServerCounters:
    def __init__(self, stack: Stack):
        self.stack = stack

    def _pg(self) -> dict[str, int]:
        with self.stack.engine().connect() as conn:
            row = conn.execute(text(f"SELECT {', '.join(PG_FIELDS)} FROM pg_stat_database WHERE datname = :db"),
                               {"db": self.stack.db_name}).one()
        return dict(zip(PG_FIELDS, (int(v) for v in row), strict=True))

    def _redis(self) -> dict[str, tuple[int, int]]:
        import redis

        client = redis.Redis.from_url(self.stack.config.redis_url)
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in stats.items()}

    def start(self) -> ServerCounters:
        self._pg0, self._redis0 = self._pg(), self._redis()
        return self

    def stop(self) -> dict[str, Any]:
        pg1, redis1 = self._pg(), self._redis()
        pg = {k: pg1[k] - self._pg0[k] for k in PG_FIELDS}
        commands = {}
        for name, (calls, usec) in redis1.items():
            c0, u0 = self._redis0.get(name, (0, 0))
            if calls > c0:
                commands[name] = (calls - c0, usec - u0)
        return {"pg_transactions": pg["xact_commit"] + pg["xact_rollback"], "pg": pg,
                "redis_calls": sum(c for c, _ in commands.values()),
                "redis_usec": sum(u for _, u in commands.values()),
                "redis_commands": dict(sorted(commands.items(), key=lambda kv: -kv[1][0]))}


def per(counts: dict[str, Any], n: float) -> dict[str, Any]:
    """The counters divided by ``n`` (turns, deltas ...), rounded for the report."""
    if not n:
        return {}
    return {"pg_transactions": round(counts["pg_transactions"] / n, 2),
            "redis_calls": round(counts["redis_calls"] / n, 1),
            "redis_usec": round(counts["redis_usec"] / n, 1),
            "redis_commands": {k: round(c / n, 2) for k, (c, _) in counts["redis_commands"].items()}}
