"""A step's event buffer: deltas coalesced, flushed to the event log in batches of one round trip.

The event log (Redis) may vanish and come back at any time: events that cannot
be appended are kept and sent with the next flush, so a Redis outage never fails
the turn. Every append also reports the turn's cancel flag, which is how a
streaming step notices a cancel without polling.

Every event of a step carries its ``step`` and ``attempt``. Appends are fenced
(:class:`~shared.streaming.protocol.Fence`, the turn's fencing number): once a
newer attempt wrote, or the turn ended, this attempt's appends are refused whole
and the step stops as a zombie. And the buffer flushes only while the lease is
known to be held: a worker frozen past its lease (SIGSTOP, a long GC pause)
holds its events until the heartbeat has found out whether the lease is still
its own, so it never writes as a zombie in the first place.
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
from shared.streaming.protocol import DURABLE_TYPES, Fence, Fenced, encode_event
from shared.turns.events import Durable, republish_session

log = logging.getLogger(__name__)

# The watch holds a step's status events (turn.started, step.started) this long (or one delta flush
# interval, if longer), unless a delta or a durable event comes to go with them: a quick step appends
# them with its first delta or its commit, not in an append of their own. Not on a retry (see below).
STATUS_HOLD_SECONDS = 0.25
# How a delta's body starts (encode_event writes the type first).
_DELTA_PREFIX = '{"type":"message.delta"'
# After a failed append, wait this long before trying the event log again (the step
# greenlet must not stall on every delta while Redis is away).
EVENT_LOG_RETRY_SECONDS = 1.0


class StepEvents:
    """Events of a running step: deltas coalesced, flushed in batches of one round trip."""

    def __init__(self, rt: Runtime, claim: Claim, *, claimed_at: float | None = None, floor: int = 0):
        self.rt, self.claim = rt, claim
        self.interval = rt.settings.delta_flush_seconds
        # A retry's step.retrying is not held: the attempt before it died, and so may this one.
        self.status_hold = max(STATUS_HOLD_SECONDS, self.interval) if claim.step_attempt <= 1 else 0.0
        # (id, body): durable events (tool.call, tool.result) have an id, so the log takes them once.
        self._pending: list[tuple[str, str]] = []
        # This attempt's durable events, written with its commit.
        self.durable: list[Durable] = []
        self._fence = Fence(claim.turn_id, claim.attempt)
        # The highest cursor the log is known to have issued (Postgres's, then this step's appends).
        self.high = floor
        # time.monotonic() until which the lease is surely still this attempt's: the claim's lease,
        # extended by each heartbeat (StepWatch.note_lease), less a margin for clock and latency.
        self.lease_valid_until = (claimed_at if claimed_at is not None else time.monotonic()) + self._lease_span()
        self._delta: list[str] = []
        self._pending_since = 0.0  # time.monotonic() when the oldest held event was added
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._last_flush = 0.0
        self._retry_at = 0.0
        self._holding = False
        # time.monotonic() when the step handed what it still holds to its commit (hand_to_commit), or 0.0.
        self._handed_at = 0.0
        self.text = ""
        self.stop_reason: StopReason | None = None
        # True while a tool runs: a cancel waits for it instead of interrupting it.
        self.in_tool = False
        # The step's spans, written with its commit (shared/engine/trace.py).
        self.trace = StepTrace(rt, claim)

    def _lease_span(self) -> float:
        settings = self.rt.settings
        return settings.lease_seconds - min(settings.heartbeat_seconds, settings.lease_seconds / 4)

    def note_lease(self, beat_started: float) -> None:
        """A heartbeat that started at ``beat_started`` (time.monotonic()) extended the lease."""
        self.lease_valid_until = max(self.lease_valid_until, beat_started + self._lease_span())

    def add(self, type_: str, data: dict[str, Any]) -> None:
        data = {**data, "step": self.claim.step, "attempt": self.claim.step_attempt}
        with self._lock:
            self._take_delta()
            if not self._pending:
                self._pending_since = time.monotonic()
            if type_ in DURABLE_TYPES:
                event = Durable.new(type_, self.claim.turn_id, data)
                self.durable.append(event)
                self._pending.append((event.id, event.body))
            else:
                self._pending.append(("", encode_event(type_, self.claim.turn_id, data)))

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
            self._pending.append(("", encode_event("message.delta", self.claim.turn_id,
                                                   {"text": "".join(self._delta), "step": self.claim.step,
                                                    "attempt": self.claim.step_attempt})))
            self._delta = []

    def flush(self, when_due: bool = False) -> bool:
        """Append what is held; False (events kept for the next flush) if the log is unreachable.

        ``when_due``: skip the attempt while backing off from a failed one, so the step
        does not stall on every call while Redis is away. What waited for a heartbeat to vouch for
        the lease and is still held when the step commits goes out with the commit (:meth:`take_held`).
        """
        if when_due and time.monotonic() < self._retry_at:
            return False
        with self._flush_lock:  # one append at a time keeps the events in order
            with self._lock:
                self._take_delta()
                if self.stop_reason == StopReason.LEASE_LOST:
                    self._pending = []  # a zombie's events never reach a client
                    return False
                if time.monotonic() > self.lease_valid_until:
                    # Not sure the lease is ours: hold them until the heartbeat knows.
                    if not self._holding:
                        self._holding = True
                        log.warning("turn %s step %s: holding %d events until a heartbeat vouches for the lease",
                                    self.claim.turn_id, self.claim.step, len(self._pending))
                    return False
                self._holding = False
                batch, self._pending = self._pending, []
                self._last_flush = time.monotonic()
            if not batch:
                return True
            try:
                done = self.rt.events.append_events(
                    self.claim.session_id, [b for _, b in batch], ids=[i for i, _ in batch], fence=self._fence,
                    floor=self.high, cancel_turn_id=self.claim.turn_id)
            except Fenced:
                log.warning("turn %s step %s: attempt %s is fenced out of the event log (a newer attempt "
                            "took over); dropping %d events", self.claim.turn_id, self.claim.step,
                            self.claim.attempt, len(batch))
                self.stop_reason = StopReason.LEASE_LOST
                return False
            except Exception as exc:  # noqa: BLE001 - Redis down: keep the events, the step goes on
                with self._lock:
                    self._pending[:0] = batch
                    self._retry_at = time.monotonic() + EVENT_LOG_RETRY_SECONDS
                log.warning("turn %s: event log unavailable, holding %d events: %s",
                            self.claim.turn_id, len(batch), exc)
                return False
            self.high = max(self.high, done.last)
            if done.cancelled and self.stop_reason is None:
                self.stop_reason = StopReason.CANCELLED
            if done.reset:
                # The log lost events (Redis lost its data, or came back from an older snapshot):
                # put the session's committed events back, for the clients now told 410.
                try:
                    self.high = max(self.high, republish_session(self.rt, self.claim.principal,
                                                                 self.claim.session_id))
                except Exception:  # noqa: BLE001 - the sweep and readers republish too
                    log.warning("turn %s: republishing after an event log reset failed", self.claim.turn_id,
                                exc_info=True)
            return True

    def hand_to_commit(self) -> None:
        """The step is done: its last deltas go out with the commit's own events, in the commit's append
        (:meth:`take_held`), not in an append of its own, and so do its durable events still held (a
        tool's result: the commit writes them, and the sweep republishes what a worker killed right after
        its commit did not). Any other event held (a tool's unknown outcome, a status) goes out now, before
        the commit, with the deltas before it: such a worker loses only deltas, whose text step.completed
        carries. The watch leaves what was handed over to the commit for ``status_hold`` seconds
        (STATUS_HOLD_SECONDS at least), so a commit riding out a database restart does not keep the step's
        last text from its viewers."""
        with self._lock:
            # A durable event (an id) is safe with the commit too: the commit writes it, the sweep republishes it.
            safe = all(event_id or body.startswith(_DELTA_PREFIX) for event_id, body in self._pending)
        if not safe:
            self.flush()  # if the log is away (or the lease not vouched for), the commit takes them too
        with self._lock:
            self._handed_at = time.monotonic()

    def take_held(self) -> tuple[list[tuple[str, str]], set[str]]:
        """What is still held, as (id, body), taken, and the ids of the durable events already appended:
        called once the step's fenced commit landed, which vouches for the lease, so what is held goes out
        with the commit's events, before them (nothing, for a zombie)."""
        with self._flush_lock, self._lock:  # after an append the watch may have in flight: the order holds
            self._take_delta()
            held, self._pending = self._pending, []
            if self.stop_reason == StopReason.LEASE_LOST:
                return [], set()
            # A durable event leaves the buffer only once appended (a failed append puts it back).
            return held, {e.id for e in self.durable} - {i for i, _ in held if i}

    def check(self) -> None:
        if self.stop_reason is not None:
            raise StepInterrupted(self.stop_reason)

    def since_flush(self) -> float:
        """Seconds since the last flush started."""
        return time.monotonic() - self._last_flush

    def pending_count(self) -> int:
        return len(self._pending) + len(self._delta)

    def flush_due(self) -> bool:
        """Whether the watch should flush now: deltas or a durable event are held, or any event for
        ``status_hold`` seconds."""
        with self._lock:
            now = time.monotonic()
            if self._handed_at and now - self._handed_at < max(STATUS_HOLD_SECONDS, self.status_hold):
                return False  # the commit sends them (hand_to_commit)
            if self._delta or any(i for i, _ in self._pending):
                return True
            return bool(self._pending) and now - self._pending_since >= self.status_hold
