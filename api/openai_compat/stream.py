"""A response as OpenAI's stream of events, translated from the session's event log.

Why a step's text is held until the step commits: OpenAI's protocol cannot take
back a delta, and a step whose worker dies is run again (``step.retrying``),
possibly saying something else. So this surface sends a step's deltas only once
its ``step.completed`` is in the log, i.e. once no attempt can replace them,
and takes the step's items (text, tool calls) from the committed rows. The
client therefore gets each step's output exactly once, with the deltas as the
model produced them, one step later than the native stream would show them.

The translation is a pure function of the log and the committed rows, so every
replay numbers the events alike: ``sequence_number`` starts at 0 per response
and ``starting_after=N`` is answered by replaying and sending what follows N,
from any API process, while the session's log is kept.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from api.openai_compat import ids, objects
from api.openai_compat.ids import ResponseRef
from api.openai_compat.store import load
from shared.auth.principal import Principal
from shared.db import unit_of_work
from shared.errors import NotFound
from shared.runtime import Runtime

# Idle polls of the log after which the rows are asked whether the response ended
# (covers events Redis lost: the rows are the truth).
IDLE_CHECK_SECONDS = 5.0
MAX_STREAM_SECONDS = 24 * 3600.0
READ_BATCH = 500
TERMINAL_EVENTS = {"turn.completed", "turn.failed", "turn.cancelled", "turn.incomplete", "turn.expired"}
CLOSING = {"completed": "response.completed", "failed": "response.failed", "incomplete": "response.incomplete",
           "cancelled": "response.incomplete"}


@dataclass
class Snapshot:
    """What the committed rows say about the response right now (plain data, no open session)."""

    response: dict[str, Any]
    views: dict[int, objects.StepView]
    turn_id: str

    def at(self, status: str) -> dict[str, Any]:
        return {**self.response, "output": [], "status": status, "completed_at": None,
                "error": None, "incomplete_details": None}


class Translator:
    """Feeds on the turn's events in log order; returns OpenAI events (without sequence numbers)."""

    def __init__(self, ref: ResponseRef, rows: Callable[[], Snapshot]):
        self.ref, self.rows = ref, rows
        self.active = ref.start == 0
        self.in_progress = False
        self.done = False
        self.sent_items: set[str] = set()
        self.next_index = 0
        self.held: tuple[int, int, list[str]] | None = None  # step, attempt, delta texts

    def begin(self, snapshot: Snapshot) -> list[dict[str, Any]]:
        return [{"type": "response.created", "response": snapshot.at("queued" if self.ref.start == 0
                                                                      else "in_progress")}]

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if self.done:
            return []
        kind, data = event.get("type"), event.get("data") or {}
        step = data.get("step")
        if kind in ("step.started", "step.retrying") and isinstance(step, int) and step >= self.ref.start:
            self.active = True
        if not self.active:
            return []
        out: list[dict[str, Any]] = []
        if not self.in_progress and kind != "turn.queued":
            self.in_progress = True
            out.append({"type": "response.in_progress", "response": self.rows().at("in_progress")})
        if kind in ("step.started", "step.retrying") and isinstance(step, int):
            # A new attempt: what an earlier attempt of this step streamed is dropped, never sent.
            self.held = (step, int(data.get("attempt") or 0), [])
        elif kind == "message.delta":
            if self.held and (data.get("step"), data.get("attempt")) == self.held[:2]:
                self.held[2].append(str(data.get("text") or ""))
        elif kind == "step.completed":
            out.extend(self._step_committed(data))
        elif kind == "turn.requires_action" or kind in TERMINAL_EVENTS:
            out.extend(self.finish())
        return out

    def _step_committed(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        step = data.get("step")
        held = self.held if self.held and (step, data.get("attempt")) == self.held[:2] else None
        self.held = None
        snapshot = self.rows()
        view = snapshot.views.get(step) if isinstance(step, int) else None
        if view is None or view.step < self.ref.start:
            return []
        turn_id = snapshot.turn_id
        out: list[dict[str, Any]] = []
        for call in view.answers:
            if ids.call_item_id(turn_id, call.step, call.index) not in self.sent_items:
                out.extend(self._whole_item(objects.call_item(turn_id, call)))
        if view.text and ids.message_item_id(turn_id, view.step) not in self.sent_items:
            chunks = held[2] if held and "".join(held[2]) == view.text else [view.text]
            out.extend(self._text_item(ids.message_item_id(turn_id, view.step), chunks))
        for call in view.calls:
            if call.answered_step == view.step and ids.call_item_id(turn_id, call.step, call.index) \
                    not in self.sent_items:
                out.extend(self._whole_item(objects.call_item(turn_id, call)))
        return out

    def finish(self) -> list[dict[str, Any]]:
        """The response ended (a pause or the turn's end): what is not sent yet, then the closing event."""
        if self.done:
            return []
        self.done = True
        final = self.rows().response
        out: list[dict[str, Any]] = []
        for item in final["output"]:
            if item["id"] in self.sent_items:
                continue
            if item["type"] == "message":
                out.extend(self._text_item(item["id"], [item["content"][0]["text"]]))
            else:
                out.extend(self._whole_item(item))
        out.append({"type": CLOSING.get(final["status"], "response.completed"), "response": final})
        return out

    def _claim_index(self, item_id: str) -> int:
        self.sent_items.add(item_id)
        index, self.next_index = self.next_index, self.next_index + 1
        return index

    def _whole_item(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        index = self._claim_index(item["id"])
        added = {**item, "status": "in_progress"} if "status" in item else item
        if item["type"] == "mcp_call":
            added = {**added, "output": None, "error": None}
        return [{"type": "response.output_item.added", "output_index": index, "item": added},
                {"type": "response.output_item.done", "output_index": index, "item": item}]

    def _text_item(self, item_id: str, chunks: list[str]) -> list[dict[str, Any]]:
        index = self._claim_index(item_id)
        text = "".join(chunks)
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        out: list[dict[str, Any]] = [
            {"type": "response.output_item.added", "output_index": index,
             "item": {"type": "message", "id": item_id, "role": "assistant", "status": "in_progress",
                      "content": []}},
            {"type": "response.content_part.added", **where, "part": part},
        ]
        out.extend({"type": "response.output_text.delta", **where, "delta": c, "logprobs": []} for c in chunks if c)
        out.append({"type": "response.output_text.done", **where, "text": text, "logprobs": []})
        out.append({"type": "response.content_part.done", **where, "part": {**part, "text": text}})
        out.append({"type": "response.output_item.done", "output_index": index,
                    "item": objects.message_item(item_id, text)})
        return out


def frame(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


def response_events(rt: Runtime, who: Principal, ref: ResponseRef, session_id: str, *,
                    after: int = 0, starting_after: int = -1) -> Iterator[str]:
    """The response's SSE frames from sequence 0 (sending those after ``starting_after``), then live ones.

    ``after`` is a log cursor known to be before the response's first event (0: scan the whole log).
    Holds no database connection between reads.
    """
    def rows() -> Snapshot:
        with unit_of_work(rt.sessions, who) as db:
            loaded = load(db, rt, who, ref)
            return Snapshot(loaded.json(), loaded.seg.views, loaded.seg.turn.id)

    translator = Translator(ref, rows)
    seq = -1

    def numbered(events: list[dict[str, Any]]) -> Iterator[str]:
        nonlocal seq
        for event in events:
            seq += 1
            if seq > starting_after:
                yield frame({"type": event.pop("type"), "sequence_number": seq, **event})

    yield from numbered(translator.begin(rows()))
    marker = f'"turn_id":"{ref.turn_id}"'
    started = last_sent = last_event = time.monotonic()
    idle_checks = 0
    seen_any = False
    heartbeat = max(0.05, rt.settings.sse_heartbeat_seconds)  # keep-alives; the credential is rechecked at each
    while not translator.done and time.monotonic() - started < MAX_STREAM_SECONDS:
        # A log that lost what follows the cursor (trimmed, Redis restarted) is read on: the idle
        # check below finishes the response from the rows.
        batch = rt.events.wait(session_id, after, min(IDLE_CHECK_SECONDS, heartbeat), READ_BATCH)
        for raw in batch.events:
            if marker in raw:
                seen_any = True
                last_event = time.monotonic()
                idle_checks = 0
                for chunk in numbered(translator.feed(json.loads(raw))):
                    last_sent = time.monotonic()
                    yield chunk
        after = max(after, batch.next)
        if translator.done:
            break
        if not batch.events and not seen_any and _ended(rows()):
            # A response that ended before its log expired away: the rows tell all of it.
            yield from numbered(translator.finish())
            break
        if not batch.events and time.monotonic() - last_event >= IDLE_CHECK_SECONDS:
            last_event = time.monotonic()
            if _ended(rows()):
                idle_checks += 1
                if idle_checks >= 2:  # ended in the rows, and still nothing in the log: it was lost
                    for chunk in numbered(translator.finish()):
                        yield chunk
                    break
        if time.monotonic() - last_sent >= heartbeat:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"


def _ended(snapshot: Snapshot) -> bool:
    return snapshot.response["status"] not in ("queued", "in_progress")


def unauthorized_frame(problem: tuple[str, str], last: str | None) -> str:
    """The error event that ends a stream whose credential expired or whose key was revoked."""
    seen = re.search(r'"sequence_number":(\d+)', last or "")
    return frame({"type": "error", "sequence_number": int(seen.group(1)) + 1 if seen else 0,
                  "code": "unauthorized", "message": problem[1], "param": None})


def not_found_frame(exc: NotFound) -> str:
    return frame({"type": "error", "sequence_number": 0, "code": "not_found", "message": exc.message,
                  "param": None})
