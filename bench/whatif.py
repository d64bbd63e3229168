"""What-if runs: the benchmark with proposed hot-path fixes applied from outside the code.

``python -m bench --whatif auth-cache,no-preping,redis-pool=50`` writes a
``sitecustomize.py`` into the run's folder (first on every served process's
PYTHONPATH) that calls :func:`install`. It patches modules right after they are
imported, so no module is imported earlier than it would be (the gevent
workers monkey-patch first). Only for measuring what a fix would buy: the
fixes themselves belong in the modules named below (docs/benchmarks.md).

- ``redis-pool=N``: ``redis.Redis.from_url`` builds a *blocking* pool of N
  (shared/runtime.py). redis-py 8 defaults to a non-blocking pool of 100 that
  raises ``MaxConnectionsError`` for the 101st concurrent user;
- ``auth-cache``: ``shared.auth.keys.identify_key`` answers from a 30-second
  in-process cache (api/auth.py), skipping a transaction per request;
- ``no-preping``: engines check connections out without ``pool_pre_ping``'s
  ``SELECT 1`` round trip (shared/db.py).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

SITECUSTOMIZE = "import os\nimport bench.whatif\n\nbench.whatif.install(os.environ.get('BENCH_WHATIF', ''))\n"


def _redis_pool(size: int) -> Callable[[ModuleType], None]:
    def patch(module: ModuleType) -> None:
        def from_url(url: str, **kwargs: Any) -> Any:
            pool = module.BlockingConnectionPool.from_url(url, max_connections=size, timeout=10, **kwargs)
            client = module.Redis(connection_pool=pool)
            client.auto_close_connection_pool = True
            return client

        module.Redis.from_url = from_url

    return patch


def _auth_cache(module: ModuleType, ttl: float = 30.0) -> None:
    original, cache = module.identify_key, {}

    def identify_key(db: Any, raw: str) -> Any:
        hit = cache.get(raw)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        identity = original(db, raw)
        if identity is not None:
            if len(cache) > 10_000:
                cache.clear()
            cache[raw] = (time.monotonic() + ttl, identity)
        return identity

    module.identify_key = identify_key


def _no_preping(module: ModuleType) -> None:
    original = module.make_engine

    def make_engine(settings: Any) -> Any:
        engine = original(settings)
        engine.pool._pre_ping = False
        return engine

    module.make_engine = make_engine


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a patch on a module the moment its own code has run, before anyone imports names from it."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]):
        self.patches = patches

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in self.patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        loader, patch = spec.loader, self.patches[name]
        original_exec = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install(spec: str) -> None:
    patches: dict[str, Callable[[ModuleType], None]] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, value = item.partition("=")
        if name == "redis-pool":
            patches["redis"] = _redis_pool(int(value or 50))
        elif name == "auth-cache":
            patches["shared.auth.keys"] = _auth_cache
        elif name == "no-preping":
            patches["shared.db"] = _no_preping
        else:
            raise ValueError(f"unknown what-if {name!r} (known: redis-pool=N, auth-cache, no-preping)")
    if patches:
        sys.meta_path.insert(0, _AfterImport(patches))
