"""The watch that runs beside a step and keeps it honest.

:class:`StepWatch` extends the lease (heartbeat), flushes held deltas, notices a
cancel request, enforces the step and turn time limits, and hands the step back
when the worker shuts down. Each duty fails alone: a Redis outage must not stop
the heartbeat, or a healthy step would be run twice.

A streaming step stops softly, at its next delta or around a tool call. Under
the gevent pool (the Procfile's worker) a step that does not stop within
:data:`HARD_STOP_GRACE` — a model waiting for its first token, a tool blocked on
I/O — is interrupted in place; Celery's own time limits do not apply to gevent
pools, so this is what enforces STEPRUN_STEP_TIME_LIMIT there.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update

from shared.clock import aware, utcnow
from shared.db import unit_of_work
from shared.engine.buffer import StepEvents
from shared.engine.claim import Claim
from shared.engine.outcome import StepInterrupted, StopReason
from shared.llm.interrupt import CallScope, call_scope
from shared.models import Turn
from shared.runtime import Runtime

log = logging.getLogger(__name__)

# How long a step may ignore a stop request before the watch interrupts it in place.
HARD_STOP_GRACE = 1.0


def _current_greenlet() -> Any:
    """The running greenlet if this process is gevent-patched (the Celery worker); else None."""
    try:
        from gevent import getcurrent, monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return None
    return getcurrent() if monkey.is_module_patched("threading") else None


class StepWatch:
    """While a step runs: flush held deltas, extend the lease, notice a cancel, enforce limits."""

    def __init__(self, rt: Runtime, claim: Claim, events: StepEvents, *,
                 deadline: float | None = None, deadline_reason: StopReason = StopReason.STEP_TIME_LIMIT):
        self.rt, self.claim, self.events = rt, claim, events
        # time.monotonic() after which the step must stop, and which limit that is.
        self.deadline, self.deadline_reason = deadline, deadline_reason
        self._done = threading.Event()
        self._target = _current_greenlet()
        self._interruptible = False
        self._stop_noticed_at: float | None = None
        self._interrupted = False
        # Threads (the embedded mode) cannot be thrown into: a stop aborts the model call's scope instead.
        self.calls = CallScope()
        # Two loops, so that an event log that hangs (Redis away) never delays the heartbeat.
        self._threads = [
            threading.Thread(target=self._run_lease, name=f"lease-{claim.turn_id}", daemon=True),
            threading.Thread(target=self._run_events, name=f"events-{claim.turn_id}", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._done.set()

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """The part of the step the watch may interrupt in place (model call and tools, not the commit)."""
        self._interruptible = True
        try:
            with call_scope(self.calls):
                yield
        finally:
            # Set before any switch can happen: a scheduled interrupt that runs later finds it False.
            self._interruptible = False

    def _run_lease(self) -> None:
        settings = self.rt.settings
        next_beat = time.monotonic() + settings.heartbeat_seconds
        while not self._done.wait(0.25):
            now = time.monotonic()
            # Beat at once when the lease is no longer vouched for (e.g. after a freeze).
            last_beat = next_beat - settings.heartbeat_seconds
            if now >= next_beat or (now > self.events.lease_valid_until and now - last_beat >= 0.5):
                next_beat = now + settings.heartbeat_seconds
                self._duty("heartbeat", self._heartbeat)
            self._duty("limits", lambda: self._enforce(time.monotonic()))

    def _run_events(self) -> None:
        next_cancel_check = time.monotonic() + 0.25
        while not self._done.wait(self.events.interval):
            now = time.monotonic()
            # Heartbeat before flush: after a freeze (SIGSTOP, a stalled host) the flush holds its
            # events until a beat has shown the lease is still this attempt's (StepEvents.flush).
            if self.events.flush_due() and now <= self.events.lease_valid_until:
                self._duty("flush", lambda: self.events.flush(when_due=True))
            if now >= next_cancel_check:
                next_cancel_check = now + 0.25
                # Every flush's append already reports the cancel flag: poll only when nothing streams
                # (a tool runs, or the model is thinking), not 4 times a second beside the appends.
                if self.events.since_flush() >= 0.25:
                    self._duty("cancel check", self._check_cancel_flag)

    def _duty(self, name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - one failed duty must not starve the others; retried next round
            log.warning("turn %s: step watch %s failed", self.claim.turn_id, name, exc_info=True)

    def _check_cancel_flag(self) -> None:
        if self.events.stop_reason is None and self.rt.events.cancel_requested(self.claim.turn_id):
            self.events.stop_reason = StopReason.CANCELLED

    def _heartbeat(self) -> None:
        started = time.monotonic()
        # Extend only a lease this attempt still holds for this step: a beat that lands after
        # the step's commit, its hand-back or the sweep's takeover must not revive the lease
        # (the next step's claim would wait for it to run out).
        with unit_of_work(self.rt.sessions, self.claim.principal) as db:
            row = db.execute(
                update(Turn).where(Turn.id == self.claim.turn_id, Turn.attempt == self.claim.attempt,
                                   Turn.step_count == self.claim.step, Turn.lease_owner.is_not(None))
                .values(lease_expires_at=utcnow() + timedelta(seconds=self.rt.settings.lease_seconds))
                .returning(Turn.cancel_requested)
                .execution_options(synchronize_session=False)
            ).first()
        if row is None:
            self.events.stop_reason = StopReason.LEASE_LOST
            return
        # Flushes go on only while a beat vouches for the lease (see shared.engine.buffer).
        self.events.note_lease(started)
        if row.cancel_requested and self.events.stop_reason is None:
            self.events.stop_reason = StopReason.CANCELLED

    def _enforce(self, now: float) -> None:
        events = self.events
        if events.stop_reason is None and self.deadline is not None and now >= self.deadline:
            events.stop_reason = self.deadline_reason
        if events.stop_reason is None and self.rt.draining.is_set():
            events.stop_reason = StopReason.SHUTDOWN
        reason = events.stop_reason
        if reason is None:
            return
        if self._stop_noticed_at is None:
            self._stop_noticed_at = now
            return
        # A cancel stops around a tool call, never inside one (its side effect may be half done);
        # limits, shutdown and a lost lease do not wait for a tool that may never return.
        if reason == StopReason.CANCELLED and events.in_tool:
            return
        if now - self._stop_noticed_at >= HARD_STOP_GRACE:
            self._interrupt(reason)

    def _interrupt(self, reason: StopReason) -> None:
        target = self._target
        if self._interrupted:
            return
        if target is None:
            # A thread (embedded mode): cut the model call's sockets and waits; it raises the stop.
            self._interrupted = True
            log.warning("turn %s step %s: interrupting a model call that did not stop (%s)",
                        self.claim.turn_id, self.claim.step, reason)
            self.calls.abort(lambda: StepInterrupted(reason))
            return
        self._interrupted = True
        import gevent

        def throw() -> None:
            # Runs in the hub while the step greenlet is switched out, so the flag is exact.
            if self._interruptible and not target.dead:
                target.throw(StepInterrupted(reason))

        log.warning("turn %s step %s: interrupting a step that did not stop (%s)",
                    self.claim.turn_id, self.claim.step, reason)
        gevent.get_hub().loop.run_callback(throw)


def step_deadline(rt: Runtime, turn_deadline: datetime | None) -> tuple[float | None, StopReason]:
    """When (time.monotonic()) this step must stop, and which limit that is."""
    limits: list[tuple[float, StopReason]] = []
    now = time.monotonic()
    if rt.settings.step_time_limit > 0:
        limits.append((now + rt.settings.step_time_limit, StopReason.STEP_TIME_LIMIT))
    if turn_deadline is not None:
        limits.append((now + (aware(turn_deadline) - utcnow()).total_seconds(), StopReason.TURN_TIME_LIMIT))
    return min(limits) if limits else (None, StopReason.STEP_TIME_LIMIT)
