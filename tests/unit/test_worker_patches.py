"""The worker's patch of kombu's Redis consumer (workers/patches.py): a worker with every slot taken polls
briefly, so the task for a slot that frees is taken at once, not at the end of Celery's 2 s drain timeout."""
from __future__ import annotations

from typing import Any

import pytest
from kombu.transport import redis as transport

from workers.patches import FULL_POLL_SECONDS, prompt_refill_when_a_slot_frees


class _Slots:
    """A channel's QoS: whether the worker has a free slot (prefetch not reached)."""

    def __init__(self, free: bool):
        self.free = free

    def can_consume(self) -> bool:
        return self.free

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Channel:
    """What the poller reads of a channel when it registers nothing (no BRPOP sent, none in flight)."""

    active_fanout_queues: tuple[str, ...] = ()
    unacked_restore_limit = unacked_restore_throttle = None
    connection_errors = ResponseError = ()
    _in_poll = None
    _brpop_sent_at = None

    def __init__(self, queues: tuple[str, ...], free: bool):
        self.active_queues, self.qos = queues, _Slots(free)

    def maybe_refresh_binding_expiry(self) -> None:
        pass


class _Poll:
    def __init__(self) -> None:
        self.waits: list[float | None] = []

    def poll(self, timeout: float | None) -> list[Any]:
        self.waits.append(timeout)
        return []


@pytest.mark.parametrize(("queues", "free", "wait"), [(("steps",), False, FULL_POLL_SECONDS), ((), True, 2.0)],
                         ids=["every-slot-taken", "nothing-consumed"])
def test_a_worker_with_every_slot_taken_polls_briefly(queues: tuple[str, ...], free: bool, wait: float) -> None:
    prompt_refill_when_a_slot_frees()
    prompt_refill_when_a_slot_frees()  # applied twice: still one wrapper
    poller = transport.MultiChannelPoller()
    poll = poller.poller = _Poll()
    poller.add(_Channel(queues, free))
    with pytest.raises(transport.Empty):
        poller.get(lambda *a: None, timeout=2.0)  # Celery's drain timeout
    assert poll.waits == [wait]
    assert getattr(transport.MultiChannelPoller.get, "steprun_prompt", False)
