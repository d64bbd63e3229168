"""The runtime: everything a process needs, built once from settings at its entrypoint."""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from shared.agent import AgentRegistry
from shared.auth.keys import KeyCache
from shared.auth.limits import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from shared.db import install_row_security, make_engine, make_sessionmaker
from shared.queue import CeleryQueue, InProcessQueue, TaskQueue
from shared.settings import Settings
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


def _usable_role(engine: Engine, role: str) -> str | None:
    """The role to drop to per transaction, if the login role may; warn where RLS is then not enforced."""
    if not role or role == "none" or engine.dialect.name != "postgresql":
        return None
    try:
        with engine.connect() as conn:
            member, superuser = conn.execute(text(
                "SELECT pg_has_role(current_user, oid, 'MEMBER'), (SELECT rolsuper FROM pg_roles "
                "WHERE rolname = current_user) FROM pg_roles WHERE rolname = :r"), {"r": role}).first() or (
                False, None)
    except Exception:  # noqa: BLE001 - the database may not be up yet; use the role as configured
        return role
    if member:
        return role
    log.warning("role %r does not exist or is not granted to the login role: row-level security %s", role,
                "is NOT enforced (superuser login)" if superuser else "relies on FORCE for the owner")
    return None


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
    # Open streams per user and tenant (shared/streaming/slots.py), across API processes.
    stream_slots: StreamSlots = field(init=False)
    redis: Any = None
    # Shutdown, in two stages: ``stopping`` (no new step starts here; deliveries are passed
    # on), then ``draining`` after a grace period (running steps hand themselves back).
    stopping: threading.Event = field(default_factory=threading.Event)
    draining: threading.Event = field(default_factory=threading.Event)
    # Who holds a lease this process takes (worker start, not import: a forked child has its own pid).
    worker_id: str = field(default_factory=process_identity)

    @classmethod
    def create(cls, settings: Settings, *, agents: AgentRegistry | None = None,
               step_runner: StepRunner | None = None) -> Runtime:
        """Build the runtime from settings.

        ``step_runner`` runs steps in this process: it is required in the embedded
        mode (no Redis), where the in-process queue calls it; Celery workers run
        steps through their task instead.
        """
        engine = make_engine(settings)
        factory = make_sessionmaker(engine)
        install_row_security(factory, _usable_role(engine, settings.db_role))
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
            rt = cls(settings, engine, factory, events, agents, redis=client)
            rt.queue = CeleryQueue(settings)
            rt.limiter = RedisRateLimiter(client, settings.redis_prefix)
            rt.stream_slots = RedisStreamSlots(client, settings.redis_prefix, settings.stream_slot_seconds)
        else:
            events = MemoryEventLog(
                retention_seconds=settings.event_retention_seconds, max_len=settings.event_log_max
            )
            rt = cls(settings, engine, factory, events, agents)
            if step_runner is None:
                raise ValueError("the embedded mode (no REDIS_URL) runs steps in-process: pass step_runner")
            runner = step_runner
            rt.queue = InProcessQueue(lambda turn_id, step: runner(rt, turn_id, step),
                                      workers=min(settings.worker_concurrency, 32))
            rt.limiter = MemoryRateLimiter()
            rt.stream_slots = MemoryStreamSlots()
        rt.key_cache = KeyCache(settings.key_cache_seconds)
        return rt

    def close(self) -> None:
        self.queue.close()
        self.events.close()
        self.engine.dispose()
