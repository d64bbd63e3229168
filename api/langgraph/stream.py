"""Bodies of the long responses: a run's SSE stream, and ``/wait`` / ``/join`` (JSON after heartbeats).

Both read the session's event log (any API process can serve any run) and
the history in short transactions of their own: no database connection is
held while waiting. A stream opens by translating the run from its first event
(:mod:`api.langgraph.frames`), sends only the frames after the client's
``Last-Event-ID``, then follows the log live until the run ends or pauses.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from api.langgraph import state
from api.langgraph.convert import human_dict
from api.langgraph.frames import AFTER_ALL, Frame, RunTranslator, frame_id
from api.relay import bound_socket
from shared.auth.principal import Principal
from shared.db import unit_of_work
from shared.errors import NotFound
from shared.metrics import track_stream
from shared.models import ACTIVE, TERMINAL, Turn, TurnStatus
from shared.runtime import Runtime
from shared.turns import service as turns

log = logging.getLogger(__name__)
# How often an idle stream or wait re-checks the run in the database (covers a lost event).
POLL_SECONDS = 5.0


class DbRunReader:
    """:class:`~api.langgraph.frames.RunReader` over the database, one short transaction per read."""

    def __init__(self, rt: Runtime, who: Principal, session_id: str, turn_id: str):
        self.rt, self.who, self.session_id, self.turn_id = rt, who, session_id, turn_id

    def _turn(self, db: Any) -> Turn:
        return turns.get_turn(db, self.who, self.turn_id)

    def values(self, step: int) -> list[dict[str, Any]]:
        with unit_of_work(self.rt.sessions, self.who) as db:
            turn = self._turn(db)
            messages = state.messages_until(db, self.who, self.session_id, turn, step)
            if step < 0:
                messages.append(human_dict(turn))
            return messages

    def step_messages(self, step: int) -> list[dict[str, Any]]:
        from api.langgraph.convert import message_dict

        with unit_of_work(self.rt.sessions, self.who) as db:
            return [message_dict(m) for m in state.step_messages(db, self.who, self.session_id, self.turn_id, step)]

    def pending(self) -> dict[str, Any] | None:
        with unit_of_work(self.rt.sessions, self.who) as db:
            return self._turn(db).pending

    def status(self) -> str:
        with unit_of_work(self.rt.sessions, self.who) as db:
            return str(self._turn(db).status)

    def final(self) -> dict[str, Any]:
        """What ``/wait`` and ``/join`` answer: the thread's values, the interrupt, or ``__error__``."""
        with unit_of_work(self.rt.sessions, self.who) as db:
            turn = self._turn(db)
            if turn.status in (TurnStatus.FAILED, TurnStatus.INCOMPLETE, TurnStatus.EXPIRED):
                error = turn.error or {}
                return {"__error__": {"error": error.get("code") or str(turn.status),
                                      "message": error.get("message") or f"the run ended {turn.status}"}}
            body: dict[str, Any] = {"messages": state.messages_until(db, self.who, self.session_id, None, None)}
            if turn.status == TurnStatus.REQUIRES_ACTION:
                body["__interrupt__"] = state.interrupts(turn)
            return body


@dataclass
class StreamRequest:
    rt: Runtime
    who: Principal
    session_id: str
    turn_id: str
    assistant_id: str
    modes: frozenset[str]
    # Frames at or before this position were sent already (Last-Event-ID), or belong before a resume.
    skip: tuple[int, int] | None = None
    # A new stream after a resume opens with a metadata frame carrying this id.
    opening: tuple[int, int] | None = None
    cancel_on_disconnect: bool = False


def _sse(frame: Frame) -> str:
    data = "null" if frame.data is None else json.dumps(frame.data, separators=(",", ":"))
    return f"id: {frame_id(frame.position)}\nevent: {frame.event}\ndata: {data}\n\n"


def run_stream(req: StreamRequest, sock: Any) -> Iterator[str]:
    """The SSE body of one run's stream; counted in ``steprun_active_streams{transport="sse"}``."""
    with track_stream("sse"):
        yield from _run_stream(req, sock)


def _run_stream(req: StreamRequest, sock: Any) -> Iterator[str]:
    rt = req.rt
    reader = DbRunReader(rt, req.who, req.session_id, req.turn_id)
    translator = RunTranslator(req.turn_id, req.session_id, req.assistant_id, req.modes, reader,
                               committed_chunks=rt.settings.langgraph_chunks == "committed")
    skip = req.skip or (-1, 0)
    heartbeat = max(0.05, rt.settings.sse_heartbeat_seconds)
    previous_timeout = bound_socket(sock, rt.settings)
    finished = False
    try:
        yield from _follow(req, reader, translator, skip, heartbeat)
        finished = True
    except _Gone as gone:
        # Rolled back (deleted) while this stream followed it: end it where it stands.
        finished = True
        yield _sse(Frame((gone.after, AFTER_ALL - 1), "end", None))
    finally:
        if sock is not None:
            try:
                sock.settimeout(previous_timeout)
            except OSError:
                pass
        if req.cancel_on_disconnect and not finished:
            _cancel_quietly(req)


class _Gone(Exception):
    def __init__(self, after: int):
        self.after = after


def _follow(req: StreamRequest, reader: DbRunReader, translator: RunTranslator, skip: tuple[int, int],
            heartbeat: float) -> Iterator[str]:
    rt = req.rt
    after, seen_run, quiet_polls, finished = 0, False, 0, False
    next_poll = 0.0  # the first time the stream is caught up, it checks the run at once
    try:
        with rt.events.listen(req.session_id) as ring:
            yield "retry: 1000\n\n"
            if req.opening is not None:
                yield _sse(Frame(req.opening, "metadata", translator.metadata()))
            last_write = time.monotonic()
            while True:
                ring.clear()
                batch = rt.events.read(req.session_id, after, max(1, rt.settings.stream_buffer))
                if batch.events:
                    out: list[str] = []
                    for text in batch.events:
                        event = json.loads(text)
                        after = int(event["cursor"])
                        if event.get("turn_id") != req.turn_id:
                            continue
                        seen_run = True
                        frames = translator.translate(after, event)
                        out.extend(_sse(f) for f in frames if f.position > skip)
                        if translator.ended:
                            if frames and frames[-1].position > skip:
                                finished = True
                                break
                            if event.get("type") != "turn.requires_action":
                                finished = True  # the client saw the run end already: nothing follows
                                break
                            translator.ended = False  # the client saw the pause: go on with the resumed run
                    if out:
                        yield "".join(out)
                        last_write = time.monotonic()
                    if finished:
                        return
                    quiet_polls = 0
                    continue
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + POLL_SECONDS
                    ending = _ending_without_events(reader, translator, seen_run, after, quiet_polls)
                    quiet_polls += 1
                    if ending is not None:
                        frames = [f for f in ending if f.position > skip]
                        if frames:
                            yield "".join(_sse(f) for f in frames)
                        finished = True
                        return
                if now - last_write >= heartbeat:
                    yield ": heartbeat\n\n"
                    last_write = time.monotonic()
                    continue
                ring.wait(min(heartbeat - (now - last_write), POLL_SECONDS))
    except NotFound:
        raise _Gone(after) from None


def _ending_without_events(reader: DbRunReader, translator: RunTranslator, seen_run: bool, after: int,
                           quiet_polls: int) -> list[Frame] | None:
    """Frames that end a stream whose run is over but whose events are not (or no longer) in the log.

    A finished run whose log has expired is told from the database (metadata,
    final values, end); a run whose ending event was lost (published after its
    commit while the log was unreachable) is ended after a quiet poll.
    """
    status = reader.status()
    if status in ACTIVE and status != TurnStatus.REQUIRES_ACTION:
        return None
    if seen_run and quiet_polls < 1:
        return None  # its ending event may be on its way: look again after one more quiet poll
    position = (0, 0) if not seen_run else (after, AFTER_ALL - 16)
    frames: list[Frame] = []

    def add(event: str, data: Any) -> None:
        frames.append(Frame((position[0], position[1] + len(frames)), event, data))

    if not seen_run:
        add("metadata", translator.metadata())
    final = reader.final()
    if "__error__" in final:
        add("error", final["__error__"])
        return frames
    if "values" in translator.modes:
        add("values", {"messages": final["messages"]})
    if "__interrupt__" in final and "updates" in translator.modes:
        add("updates", {"__interrupt__": final["__interrupt__"]})
    add("end", None)
    return frames


def _cancel_quietly(req: StreamRequest) -> None:
    try:
        with unit_of_work(req.rt.sessions, req.who) as db:
            turns.cancel_turn(db, req.rt, req.who, req.turn_id)
    except Exception:  # noqa: BLE001 - the client is gone; the run goes on if it cannot be cancelled
        log.warning("run %s: cancel on disconnect failed", req.turn_id, exc_info=True)


def wait_body(rt: Runtime, who: Principal, session_id: str, turn_id: str) -> Iterator[str]:
    """``/wait`` and ``/join``: whitespace heartbeats until the run ends or pauses, then its JSON.

    The heartbeats keep proxies from closing an idle connection and tell the
    server when the client left; JSON allows the leading whitespace.
    """
    reader = DbRunReader(rt, who, session_id, turn_id)
    heartbeat = max(0.05, rt.settings.sse_heartbeat_seconds)
    last_write = time.monotonic()
    while True:
        checked = time.monotonic()
        cursor = rt.events.head(session_id)  # read before the status, so a change in between still wakes us
        try:
            status = reader.status()
            if status in TERMINAL or status == TurnStatus.REQUIRES_ACTION:
                yield json.dumps(reader.final(), separators=(",", ":"))
                return
        except NotFound:  # rolled back (deleted) while we waited
            yield json.dumps({"__error__": {"error": "rolled_back", "message": f"run {turn_id} was rolled back"}})
            return
        rt.events.wait(session_id, cursor, min(POLL_SECONDS, heartbeat), limit=1)
        # Tokens wake the wait many times a second: look at the run at most 5 times a second.
        time.sleep(max(0.0, 0.2 - (time.monotonic() - checked)))
        if time.monotonic() - last_write >= heartbeat:
            yield "\n"
            last_write = time.monotonic()
