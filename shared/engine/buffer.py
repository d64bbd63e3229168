"""A step's event buffer: deltas coalesced, flushed to the event log in batches of one round trip.

The event log (Redis) may vanish and come back at any time: events that cannot
be appended are kept and sent with the next flush, so a Redis outage never fails
the turn. Every append also reports the turn's cancel flag, which is how a
streaming step notices a cancel without polling.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from shared.engine.claim import Claim
from shared.engine.outcome import StepInterrupted, StopReason
from shared.engine.trace import StepTrace
from shared.runtime import Runtime
from shared.streaming.protocol import encode_event

log = logging.getLogger(__name__)

# After a failed append, wait this long before trying the event log again (the step
# greenlet must not stall on every delta while Redis is away).
EVENT_LOG_RETRY_SECONDS = 1.0


class StepEvents:
    """Events of a running step: deltas coalesced, flushed in batches of one round trip."""

    def __init__(self, rt: Runtime, claim: Claim):
        self.rt, self.claim = rt, claim
        self.interval = rt.settings.delta_flush_seconds
        self._pending: list[str] = []
        self._delta: list[str] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._last_flush = 0.0
        self._retry_at = 0.0
        self.text = ""
        self.stop_reason: StopReason | None = None
        # True while a tool runs: a cancel waits for it instead of interrupting it.
        self.in_tool = False
        # The step's spans, written with its commit (shared/engine/trace.py).
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
                self.stop_reason = StopReason.CANCELLED
            return True

    def check(self) -> None:
        if self.stop_reason is not None:
            raise StepInterrupted(self.stop_reason)

    def since_flush(self) -> float:
        """Seconds since the last flush started."""
        return time.monotonic() - self._last_flush

    def pending_count(self) -> int:
        return len(self._pending) + len(self._delta)
