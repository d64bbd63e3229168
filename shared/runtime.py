"""The runtime: everything a process needs, built once from settings at its entrypoint."""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.agent import AgentRegistry
from shared.auth.keys import KeyCache, LiveKeys
from shared.auth.limits import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from shared.checkpoints import HistoryCache
from shared.db import UnsafeLogin, install_row_security, make_app_engine, make_engine, make_sessionmaker
from shared.queue import CeleryQueue, InProcessQueue, TaskQueue
from shared.settings import Settings, SettingsError
from shared.streaming.memory_log import MemoryEventLog
from shared.streaming.protocol import EventLog
from shared.streaming.redis_log import RedisEventLog
from shared.streaming.slots import MemoryStreamSlots, RedisStreamSlots, StreamSlots

log = logging.getLogger(__name__)

# Runs one step of a turn in this process (shared.engine.step.run_step_in_process).
StepRunner = Callable[["Runtime", str, int], Any]


def process_identity() -> str:
    """This process's name in lease rows and logs: host and pid, taken when its runtime is built."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _app_engine(settings: Settings, owner: Engine, *, dev: bool) -> Engine | None:
    """The application login's engine (user data, under row-level security), or None on SQLite.

    Outside ``steprun dev`` (``dev``), a Postgres deployment without one (STEPRUN_DB_ROLE=none), or whose
    login is a superuser, BYPASSRLS or a member of another role, is refused: its isolation would rest on
    the application's code alone.
    """
    if owner.dialect.name != "postgresql":
        return None
    url = settings.app_sqlalchemy_url
    if url is None:
        if not dev:
            raise SettingsError(
                "STEPRUN_DB_ROLE=none runs every request as DATABASE_URL's login, which row-level security does "
                "not bind: only `steprun dev` may do that. Unset STEPRUN_DB_ROLE (the steprun_app login that "
                "`steprun migrate` creates) or set STEPRUN_APP_DATABASE_URL")
        log.warning("STEPRUN_DB_ROLE=none: row-level security is off (steprun dev only)")
        return None
    engine = make_app_engine(settings, url, allow_unsafe=dev)
    try:
        with engine.connect():
            pass  # opens one connection: the login's check runs now, not at the first request
    except UnsafeLogin as exc:
        engine.dispose()
        raise SettingsError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the database may not be up yet; each connection checks again
        log.warning("cannot check the application login yet (%s): each new connection will", type(exc).__name__)
    return engine


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    events: EventLog
    agents: AgentRegistry
    queue: TaskQueue = field(init=False)
    limiter: RateLimiter = field(init=False)
    key_cache: KeyCache = field(init=False)
    # The histories of the checkpoints this process wrote (a worker's next step of a session reads no chain).
    history_cache: HistoryCache = field(init=False)
    live_keys: LiveKeys = field(init=False)
    # Open streams per user and tenant (shared/streaming/slots.py), across API processes.
    stream_slots: StreamSlots = field(init=False)
    redis: Any = None
    # The application login's engine, under row-level security; ``engine`` is the owner's (migrations and the
    # system path). None on SQLite and with STEPRUN_DB_ROLE=none in `steprun dev`.
    app_engine: Engine | None = None
    # Shutdown, in two stages: ``stopping`` (no new step starts here; deliveries are passed
    # on), then ``draining`` after a grace period (running steps hand themselves back).
    stopping: threading.Event = field(default_factory=threading.Event)
    draining: threading.Event = field(default_factory=threading.Event)
    # Who holds a lease this process takes (worker start, not import: a forked child has its own pid).
    worker_id: str = field(default_factory=process_identity)

    @classmethod
    def create(cls, settings: Settings, *, agents: AgentRegistry | None = None,
               step_runner: StepRunner | None = None, dev: bool = False) -> Runtime:
        """Build the runtime from settings.

        ``step_runner`` runs steps in this process: it is required in the embedded
        mode (no Redis), where the in-process queue calls it; Celery workers run
        steps through their task instead.
        """
        engine = make_engine(settings)
        app_engine = _app_engine(settings, engine, dev=dev)
        factory = make_sessionmaker(app_engine or engine, system_engine=engine if app_engine else None)
        install_row_security(factory, app_engine)
        agents = agents or AgentRegistry.from_module(settings.agents_module)
        if settings.redis_url:
            import redis

            # A blocking pool: under load, callers wait (up to 5 s) for a connection instead of
            # failing at redis-py's default cap of 100 (measured: thousands of failed reads in fan-out).
            pool = redis.BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=settings.redis_max_connections, timeout=5,
                socket_connect_timeout=5, socket_timeout=10, health_check_interval=30,
            )
            client = redis.Redis(connection_pool=pool)
            events: EventLog = RedisEventLog(
                client,
                prefix=settings.redis_prefix,
                retention_seconds=settings.event_retention_seconds,
                max_len=settings.event_log_max,
            )
            rt = cls(settings, engine, factory, events, agents, redis=client, app_engine=app_engine)
            rt.queue = CeleryQueue(settings, client)
            rt.limiter = RedisRateLimiter(client, settings.redis_prefix)
            rt.stream_slots = RedisStreamSlots(client, settings.redis_prefix, settings.stream_slot_seconds)
        else:
            events = MemoryEventLog(
                retention_seconds=settings.event_retention_seconds, max_len=settings.event_log_max
            )
            rt = cls(settings, engine, factory, events, agents, app_engine=app_engine)
            if step_runner is None:
                raise ValueError("the embedded mode (no REDIS_URL) runs steps in-process: pass step_runner")
            runner = step_runner
            rt.queue = InProcessQueue(lambda turn_id, step: runner(rt, turn_id, step),
                                      workers=min(settings.worker_concurrency, 32))
            rt.limiter = MemoryRateLimiter()
            rt.stream_slots = MemoryStreamSlots()
        rt.key_cache = KeyCache(settings.key_cache_seconds)
        rt.history_cache = HistoryCache(settings.history_cache_messages)
        # Half the window: a socket rechecking at that period closes within the window of a revoke.
        rt.live_keys = LiveKeys(settings.key_cache_seconds / 2)
        return rt

    def close(self) -> None:
        self.queue.close()
        self.events.close()
        self.engine.dispose()
        if self.app_engine is not None:
            self.app_engine.dispose()
