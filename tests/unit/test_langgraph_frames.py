"""The translation of a run's events into LangGraph frames: exact chunks across retried attempts."""
from __future__ import annotations

from typing import Any

from api.langgraph.frames import AFTER_ALL, RunTranslator, frame_id, parse_position

RUN = "turn_x"


class Committed:
    """What the history says once steps have committed."""

    def __init__(self, texts: dict[int, str]):
        self.texts = texts

    def values(self, step: int) -> list[dict[str, Any]]:
        return [{"type": "ai", "content": self.texts[s], "id": f"{RUN}-{s}-ai"} for s in sorted(self.texts)
                if s <= step]

    def step_messages(self, step: int) -> list[dict[str, Any]]:
        return [{"type": "ai", "content": self.texts[step], "id": f"{RUN}-{step}-ai", "tool_calls": []}]

    def pending(self) -> dict[str, Any] | None:
        return None


def delta(text: str, step: int = 0, attempt: int = 1) -> dict[str, Any]:
    return {"type": "message.delta", "turn_id": RUN, "data": {"text": text, "step": step, "attempt": attempt}}


def event(type_: str, **data: Any) -> dict[str, Any]:
    return {"type": type_, "turn_id": RUN, "data": data}


def translate(events: list[dict[str, Any]], texts: dict[int, str], modes: set[str], committed: bool = False):  # noqa: ANN201
    t = RunTranslator(RUN, "ses_x", "math", frozenset(modes), Committed(texts), committed_chunks=committed)
    frames = []
    for cursor, e in enumerate(events, start=100):
        frames.extend(t.translate(cursor, e))
    return frames, t


def chunks(frames: list[Any]) -> str:
    return "".join(f.data[0]["content"] for f in frames if f.event == "messages")


def test_a_retried_step_sends_only_text_past_what_was_sent() -> None:
    events = [event("turn.queued"), event("turn.started"), delta("Hel"), delta("lo wor"),
              event("step.retrying", step=0, attempt=2), delta("Hello", attempt=2),
              delta("lo wor", attempt=1),  # a zombie attempt's late append: never shown
              delta(" world", attempt=2), event("step.completed", step=0, attempt=2), event("turn.completed")]
    frames, t = translate(events, {0: "Hello world"}, {"messages-tuple", "values"})
    assert chunks(frames) == "Hello world"
    assert [f.event for f in frames][0] == "metadata" and frames[-1].event == "end" and t.ended
    assert len({f.position for f in frames}) == len(frames)


def test_a_retry_that_says_something_else_stops_chunking_and_messages_mode_replaces_it() -> None:
    events = [delta("The answer is 4"), event("step.retrying", step=0, attempt=2), delta("It is 5", attempt=2),
              delta(" exactly", attempt=2), event("step.completed", step=0, attempt=2)]
    frames, _ = translate(events, {0: "It is 5 exactly"}, {"messages-tuple", "messages", "updates"})
    assert chunks(frames) == "The answer is 4"  # what was sent cannot be unsent; nothing stale is added
    partials = [f.data[0]["content"] for f in frames if f.event == "messages/partial"]
    assert partials[-1] == "It is 5 exactly"  # cumulative frames replace the dead attempt's text
    complete = [f.data for f in frames if f.event == "messages/complete"]
    assert complete[0][0]["content"] == "It is 5 exactly"
    assert [f.data for f in frames if f.event == "updates"][0]["agent"]["messages"][0]["content"] == "It is 5 exactly"


def test_committed_chunks_wait_for_the_commit() -> None:
    events = [delta("Hel"), delta("lo"), event("step.completed", step=0, attempt=1), delta("Bye", step=1),
              event("step.completed", step=1, attempt=1)]
    frames, _ = translate(events, {0: "Hello", 1: "Bye"}, {"messages-tuple"}, committed=True)
    assert [f.data[0]["content"] for f in frames if f.event == "messages"] == ["Hello", "Bye"]
    assert all(f.position[0] in (102, 104) for f in frames)  # only at the commits


def test_text_the_deltas_missed_is_sent_at_the_commit() -> None:
    frames, _ = translate([delta("Hel"), event("step.completed", step=0, attempt=1)], {0: "Hello"},
                          {"messages-tuple"})
    assert chunks(frames) == "Hello"


def test_frame_ids_round_trip_and_order() -> None:
    assert parse_position(frame_id((17, 3))) == (17, 3)
    assert parse_position("17") == (17, AFTER_ALL) > (17, 99)
    assert parse_position("abc") is None and parse_position("1-x") is None and parse_position("") is None
