"""What runs beside a step: its event buffer, and the watch that keeps it honest.

:class:`StepEvents` batches a step's events into one event-log round trip per
flush. The event log (Redis) may vanish and come back at any time: events that
cannot be appended are kept and sent with the next flush, so a Redis restart
costs clients their old cursors (they get a 410 and read the history) but never
fails the turn.

:class:`StepWatch` runs next to the step. It extends the lease (heartbeat),
notices a cancel request, enforces the step and turn time limits, and hands the
step back when the worker shuts down. Each duty fails alone: a Redis outage
must not stop the heartbeat, or a healthy step would be run twice.

A streaming step stops softly, at its next delta or around a tool call. Under
the gevent pool (the Procfile's worker) a step that does not stop within
:data:`HARD_STOP_GRACE` — a model waiting for its first token, a tool blocked on
I/O — is interrupted in place; Celery's own time limits do not apply to gevent
pools, so this is what enforces STEPRUN_STEP_TIME_LIMIT there.

:func:`stopped_outcome` turns a step stopped early into its result: the partial
answer is kept (marked ``cancelled`` or ``incomplete``) and tool calls left open
are answered, so the history stays valid for any model.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from shared.db import unit_of_work
from shared.events import encode_event
from shared.models import Turn, utcnow
from shared.traces import StepTrace

if TYPE_CHECKING:
    from shared.runtime import Runtime

log = logging.getLogger(__name__)

# Why a step stopped before its end.
CANCELLED = "cancelled"
LEASE_LOST = "lease_lost"
STEP_TIME_LIMIT = "step_time_limit"
TURN_TIME_LIMIT = "turn_time_limit"
SHUTDOWN = "shutdown"

# How long a step may ignore a stop request before the watch interrupts it in place.
HARD_STOP_GRACE = 1.0
# After a failed append, wait this long before trying the event log again (the step
# greenlet must not stall on every delta while Redis is away).
EVENT_LOG_RETRY_SECONDS = 1.0


class StepInterrupted(BaseException):
    """Raised inside the step to stop it: cancelled, lease lost, a time limit, or shutdown.

    A BaseException, like GreenletExit, so that a tool's or a client library's
    ``except Exception`` cannot swallow it and carry on.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StepEvents:
    """Events of a running step: deltas coalesced, flushed in batches of one round trip."""

    def __init__(self, rt: Runtime, claim: Any):
        self.rt, self.claim = rt, claim
        self.interval = rt.settings.delta_flush_seconds
        self._pending: list[str] = []
        self._delta: list[str] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._last_flush = 0.0
        self._retry_at = 0.0
        self.text = ""
        self.stop_reason: str | None = None
        # True while a tool runs: a cancel waits for it instead of interrupting it.
        self.in_tool = False
        # The step's spans, written with its commit (shared/traces.py).
        self.trace = StepTrace(rt, claim)

    def add(self, type_: str, data: dict[str, Any]) -> None:
        with self._lock:
            self._take_delta()
            self._pending.append(encode_event(type_, self.claim.turn_id, data))

    def delta(self, text: str) -> None:
        self.check()
        with self._lock:
            self._delta.append(text)
            self.text += text
            due = time.monotonic() - self._last_flush >= self.interval
        if due:
            self.flush(when_due=True)

    def _take_delta(self) -> None:
        if self._delta:
            # step and attempt let a client drop what an earlier attempt of this step streamed.
            self._pending.append(encode_event("message.delta", self.claim.turn_id,
                                              {"text": "".join(self._delta), "step": self.claim.step,
                                               "attempt": self.claim.step_attempt}))
            self._delta = []

    def flush(self, when_due: bool = False) -> bool:
        """Append what is held; False (events kept for the next flush) if the log is unreachable.

        ``when_due``: skip the attempt while backing off from a failed one, so the step
        does not stall on every call while Redis is away.
        """
        if when_due and time.monotonic() < self._retry_at:
            return False
        with self._flush_lock:  # one append at a time keeps the events in order
            with self._lock:
                self._take_delta()
                bodies, self._pending = self._pending, []
                self._last_flush = time.monotonic()
            if not bodies:
                return True
            try:
                _, cancelled = self.rt.events.append(self.claim.session_id, bodies,
                                                     cancel_turn_id=self.claim.turn_id)
            except Exception as exc:  # noqa: BLE001 - Redis down: keep the events, the step goes on
                with self._lock:
                    self._pending[:0] = bodies
                    self._retry_at = time.monotonic() + EVENT_LOG_RETRY_SECONDS
                log.warning("turn %s: event log unavailable, holding %d events: %s",
                            self.claim.turn_id, len(bodies), exc)
                return False
            if cancelled and self.stop_reason is None:
                self.stop_reason = CANCELLED
            return True

    def check(self) -> None:
        if self.stop_reason is not None:
            raise StepInterrupted(self.stop_reason)

    def pending_count(self) -> int:
        return len(self._pending) + len(self._delta)


def _current_greenlet() -> Any:
    """The running greenlet if this process is gevent-patched (the Celery worker); else None."""
    try:
        from gevent import getcurrent, monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return None
    return getcurrent() if monkey.is_module_patched("threading") else None


class StepWatch:
    """While a step runs: flush held deltas, extend the lease, notice a cancel, enforce limits."""

    def __init__(self, rt: Runtime, claim: Any, events: StepEvents, *,
                 deadline: float | None = None, deadline_reason: str = STEP_TIME_LIMIT):
        self.rt, self.claim, self.events = rt, claim, events
        # time.monotonic() after which the step must stop, and which limit that is.
        self.deadline, self.deadline_reason = deadline, deadline_reason
        self._done = threading.Event()
        self._target = _current_greenlet()
        self._interruptible = False
        self._stop_noticed_at: float | None = None
        self._interrupted = False
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
            yield
        finally:
            # Set before any switch can happen: a scheduled interrupt that runs later finds it False.
            self._interruptible = False

    def _run_lease(self) -> None:
        settings = self.rt.settings
        next_beat = time.monotonic() + settings.heartbeat_seconds
        while not self._done.wait(0.25):
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + settings.heartbeat_seconds
                self._duty("heartbeat", self._heartbeat)
            self._duty("limits", lambda: self._enforce(time.monotonic()))

    def _run_events(self) -> None:
        next_cancel_check = time.monotonic() + 0.25
        while not self._done.wait(self.events.interval):
            now = time.monotonic()
            if self.events.pending_count():
                self._duty("flush", lambda: self.events.flush(when_due=True))
            if now >= next_cancel_check:
                next_cancel_check = now + 0.25
                # Every flush's append already reports the cancel flag: poll only when nothing streams
                # (a tool runs, or the model is thinking), not 4 times a second beside the appends.
                if now - self.events._last_flush >= 0.25:
                    self._duty("cancel check", self._check_cancel_flag)

    def _duty(self, name: str, fn: Any) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - one failed duty must not starve the others; retried next round
            log.warning("turn %s: step watch %s failed", self.claim.turn_id, name, exc_info=True)

    def _check_cancel_flag(self) -> None:
        if self.events.stop_reason is None and self.rt.events.cancel_requested(self.claim.turn_id):
            self.events.stop_reason = CANCELLED

    def _heartbeat(self) -> None:
        # Extend only a lease this attempt still holds for this step: a beat that lands after
        # the step's commit, its hand-back or the sweep's takeover must not revive the lease
        # (the next step's claim would wait for it to run out).
        with unit_of_work(self.rt.sessions, self.claim) as db:
            row = db.execute(
                update(Turn).where(Turn.id == self.claim.turn_id, Turn.attempt == self.claim.attempt,
                                   Turn.step_count == self.claim.step, Turn.lease_owner.is_not(None))
                .values(lease_expires_at=utcnow() + timedelta(seconds=self.rt.settings.lease_seconds))
                .returning(Turn.cancel_requested)
                .execution_options(synchronize_session=False)
            ).first()
        if row is None:
            self.events.stop_reason = LEASE_LOST
        elif row.cancel_requested and self.events.stop_reason is None:
            self.events.stop_reason = CANCELLED

    def _enforce(self, now: float) -> None:
        events = self.events
        if events.stop_reason is None and self.deadline is not None and now >= self.deadline:
            events.stop_reason = self.deadline_reason
        if events.stop_reason is None and self.rt.draining.is_set():
            events.stop_reason = SHUTDOWN
        reason = events.stop_reason
        if reason is None:
            return
        if self._stop_noticed_at is None:
            self._stop_noticed_at = now
            return
        # A cancel stops around a tool call, never inside one (its side effect may be half done);
        # limits, shutdown and a lost lease do not wait for a tool that may never return.
        if reason == CANCELLED and events.in_tool:
            return
        if now - self._stop_noticed_at >= HARD_STOP_GRACE:
            self._interrupt(reason)

    def _interrupt(self, reason: str) -> None:
        target = self._target
        if target is None or self._interrupted:
            return  # threads (embedded mode) cannot be interrupted: the step stops at its next check
        self._interrupted = True
        import gevent

        def throw() -> None:
            # Runs in the hub while the step greenlet is switched out, so the flag is exact.
            if self._interruptible and not target.dead:
                target.throw(StepInterrupted(reason))

        log.warning("turn %s step %s: interrupting a step that did not stop (%s)",
                    self.claim.turn_id, self.claim.step, reason)
        gevent.get_hub().loop.run_callback(throw)


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything steprun stores is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def step_deadline(rt: Runtime, turn_deadline: datetime | None) -> tuple[float | None, str]:
    """When (time.monotonic()) this step must stop, and which limit that is."""
    limits: list[tuple[float, str]] = []
    now = time.monotonic()
    if rt.settings.step_time_limit > 0:
        limits.append((now + rt.settings.step_time_limit, STEP_TIME_LIMIT))
    if turn_deadline is not None:
        limits.append((now + (aware(turn_deadline) - utcnow()).total_seconds(), TURN_TIME_LIMIT))
    return min(limits) if limits else (None, STEP_TIME_LIMIT)


def stopped_outcome(result: Any, reason: str, rt: Runtime, events: StepEvents,
                    state: list[dict[str, Any]]) -> Any:
    """Make ``result`` (a StepResult) the outcome of a step stopped early: its partial output kept, marked."""
    limits = rt.settings
    status, error = {
        CANCELLED: ("cancelled", None),
        TURN_TIME_LIMIT: ("incomplete", {"code": "max_turn_time", "message":
                          f"the turn ran longer than STEPRUN_TURN_TIME_LIMIT ({limits.turn_time_limit:g} s)"}),
        STEP_TIME_LIMIT: ("failed", {"code": "step_time_limit", "message":
                          f"step {events.claim.step} ran longer than STEPRUN_STEP_TIME_LIMIT "
                          f"({limits.step_time_limit:g} s)"}),
    }[reason]
    result.status, result.error = status, error
    if not any(m["role"] == "assistant" for m in result.new_messages):
        # Stopped while the model streamed: what it said so far goes to the history.
        result.text = events.text
        if events.text:
            result.new_messages.append({"role": "assistant", "content": events.text,
                                        "_status": "cancelled" if reason == CANCELLED else "incomplete"})
    close_tool_calls(state, result.new_messages, {
        CANCELLED: "not run: the turn was cancelled",
        TURN_TIME_LIMIT: "stopped: the turn ran out of time",
        STEP_TIME_LIMIT: "stopped: the step ran out of time",
    }[reason])
    return result


def close_tool_calls(state: list[dict[str, Any]], new: list[dict[str, Any]], note: str) -> None:
    """Answer tool calls a stopped step left open, so the history stays valid for any model."""
    history = state + new
    for i in range(len(history) - 1, -1, -1):
        if history[i].get("role") != "assistant":
            continue
        answered = {m.get("tool_call_id") for m in history[i + 1:] if m.get("role") == "tool"}
        for call in history[i].get("tool_calls") or []:
            if call["id"] not in answered:
                new.append({"role": "tool", "tool_call_id": call["id"],
                            "name": call.get("function", {}).get("name"), "content": note})
        return
