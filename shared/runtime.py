"""The runtime: everything a process needs, built once from settings at its entrypoint."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from shared.agent import AgentRegistry
from shared.db import install_row_security, make_engine, make_sessionmaker
from shared.events import EventLog, MemoryEventLog, RedisEventLog
from shared.keys import KeyCache
from shared.limits import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from shared.queue import CeleryQueue, InProcessQueue, TaskQueue
from shared.settings import Settings

log = logging.getLogger(__name__)


def after_commit(db: Session, callback: Callable[[], Any]) -> None:
    """Run ``callback`` once the current transaction commits; drop it on rollback.

    This is how work is enqueued: a task can never run before its row exists.
    """
    db.info.setdefault("after_commit", []).append(callback)


def _install_after_commit(factory: sessionmaker[Session]) -> None:
    @event.listens_for(factory, "after_commit")
    def _run(db: Session) -> None:
        for callback in db.info.pop("after_commit", []):
            try:
                callback()
            except Exception:  # noqa: BLE001 - committed state is safe; the scheduler re-sends lost work
                log.exception("after-commit action failed; the scheduler will recover it")

    @event.listens_for(factory, "after_rollback")
    def _drop(db: Session) -> None:
        db.info.pop("after_commit", None)


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
    redis: Any = None
    # Shutdown, in two stages: ``stopping`` (no new step starts here; deliveries are passed
    # on), then ``draining`` after a grace period (running steps hand themselves back).
    stopping: threading.Event = field(default_factory=threading.Event)
    draining: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def create(cls, settings: Settings, *, agents: AgentRegistry | None = None) -> Runtime:
        engine = make_engine(settings)
        factory = make_sessionmaker(engine)
        _install_after_commit(factory)
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
        else:
            events = MemoryEventLog(
                retention_seconds=settings.event_retention_seconds, max_len=settings.event_log_max
            )
            rt = cls(settings, engine, factory, events, agents)
            rt.queue = InProcessQueue(rt.run_step, workers=min(settings.worker_concurrency, 32))
            rt.limiter = MemoryRateLimiter()
        rt.key_cache = KeyCache(settings.key_cache_seconds)
        return rt

    def run_step(self, turn_id: str, step: int) -> None:
        from shared.logs import log_context
        from shared.steps import run_step

        # A pool thread lives on after the step: scope the step's log ids to it.
        with log_context(turn_id=turn_id, step=step):
            run_step(self, turn_id, step)

    def close(self) -> None:
        self.queue.close()
        self.events.close()
        self.engine.dispose()
