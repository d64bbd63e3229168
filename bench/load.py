"""A load-generator process: ``python -m bench.load`` with one JSON job on its stdin.

Run by the benchmark orchestrator (bench/scenarios.py), several at once, each
in its own process group. A generator is a gevent process: one greenlet per
virtual user or connection, real sockets on loopback. It writes one JSON
object per line to stdout: ``{"progress": {...}}`` now and then, and one
``{"result": {...}}`` at the end. Every job is bounded by a wall-clock
deadline it was given, and stops by itself.
"""
from gevent import monkey

monkey.patch_all()

import http.client as http_client  # noqa: E402 - after monkey patching, as gevent requires
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.pool  # noqa: E402

from bench.client import Http, HttpError, create_session, open_stream, start_turn, wait_turn  # noqa: E402

TERMINAL = {"turn.completed", "turn.failed", "turn.cancelled", "turn.expired", "turn.incomplete",
            "turn.requires_action"}
RESPONSE_TERMINAL = {"response.completed", "response.failed", "response.incomplete"}


# SIGUSR1 from the orchestrator: the scenario has what it needs, stop now (before the job's deadline).
RELEASE = gevent.event.Event()


def emit(kind: str, value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({kind: value}) + "\n")
    sys.stdout.flush()


def ticker(every: float, report: Callable[[], dict[str, Any]]) -> gevent.Greenlet:
    def run() -> None:
        while True:
            gevent.sleep(every)
            emit("progress", report())

    return gevent.spawn(run)


# --- throughput: closed-loop virtual users, one session each ----------------------

def throughput(job: dict[str, Any]) -> dict[str, Any]:
    """Each user starts a turn, waits for it to end, starts the next, until the deadline."""
    url, keys, agent = job["url"], job["keys"], job["agent"]
    start_at, measure_from, stop_at = job["start_at"], job["measure_from"], job["stop_at"]
    samples: list[tuple[float, float, str]] = []  # (finished wall time, latency s, status)
    errors: list[str] = []
    stream_kind = ""

    def user(i: int) -> None:
        nonlocal stream_kind
        key = keys[i % len(keys)]  # one end user per virtual user, as in production
        http = Http(url, key)
        session_id = create_session(http, agent)
        stream = open_stream(url, key, session_id, after=0, prefer=job["stream"]) if job["observe"] == "stream" \
            else None
        stream_kind = stream.kind if stream else "turn long-poll (GET /v1/turns/{id}?wait=)"
        events = stream.events() if stream else None
        gevent.sleep(max(0.0, start_at - time.time()) + (i % 50) * 0.002)
        while time.time() < stop_at:
            t0 = time.perf_counter()
            try:
                turn = start_turn(http, session_id, "please add 20 and 22")
                if events is None:
                    status = wait_turn(http, turn["id"])["status"]
                else:
                    status = next(e["type"] for e in events
                                  if e.get("turn_id") == turn["id"] and e["type"] in TERMINAL)
            except (HttpError, OSError, StopIteration) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                gevent.sleep(0.2)
                continue
            samples.append((time.time(), time.perf_counter() - t0, status))
        if stream:
            stream.close()
        http.close()

    progress = ticker(1.0, lambda: {"done": len(samples), "errors": len(errors)})
    pool = gevent.pool.Pool(job["users"])
    for i in range(job["users"]):
        pool.spawn(user, i)
    pool.join(timeout=max(0.0, stop_at - time.time()) + job.get("drain", 30.0))
    pool.kill(block=True, timeout=2)
    progress.kill()
    window = [(t, lat, s) for t, lat, s in samples if measure_from <= t <= stop_at]
    return {"completed": sum(1 for _, _, s in window if s == "turn.completed" or s == "completed"),
            "finished": len(window), "latencies": [lat for _, lat, _ in window],
            "statuses": sorted({s for _, _, s in samples}), "errors": errors[:20], "error_count": len(errors),
            "stream": stream_kind}


# --- overhead: POST to first delta, one user at light load -------------------------

def overhead(job: dict[str, Any]) -> dict[str, Any]:
    url, key = job["url"], job["key"]
    http = Http(url, key)
    session_id = create_session(http, job["agent"])
    stream = open_stream(url, key, session_id, after=0, prefer=job["stream"])
    events = stream.events()
    first_delta: list[float] = []
    post_rtt: list[float] = []
    errors: list[str] = []
    progress = ticker(1.0, lambda: {"done": len(first_delta)})
    while time.time() < job["stop_at"] and len(first_delta) < job["turns"]:
        t0 = time.perf_counter()
        try:
            turn = start_turn(http, session_id, "hello")
            t_posted = time.perf_counter()
            got = None
            for e in events:
                if e.get("turn_id") != turn["id"]:
                    continue
                if got is None and e["type"] == "message.delta":
                    got = time.perf_counter()
                if e["type"] in TERMINAL:
                    break
        except (HttpError, OSError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
            continue
        if got is not None:
            first_delta.append(got - t0)
            post_rtt.append(t_posted - t0)
        gevent.sleep(job.get("pause", 0.05))
    progress.kill()
    stream.close()
    return {"first_delta": first_delta, "post_rtt": post_rtt, "errors": errors[:20], "stream": stream.kind}


# --- responses: the same single-step streamed turns, native stream vs POST /v1/responses -----

def _responses_turn(http: Http, conversation: str, agent: str, text: str) -> str:
    """POST /v1/responses with stream=true; reads the SSE to its end; the terminal event's type."""
    conn = http._conn
    if conn is None:
        conn = http._conn = http_client.HTTPConnection(http.host, http.port, timeout=http.timeout)
    body = json.dumps({"model": agent, "input": text, "stream": True, "conversation": conversation}).encode()
    try:
        conn.request("POST", "/v1/responses", body=body, headers=http.headers)
        response = conn.getresponse()
        if response.status != 200:
            raise HttpError(response.status, response.read())
        terminal = ""
        while True:
            line = response.readline()
            if not line:
                break
            if line.startswith(b"event: ") and not terminal:
                kind = line[7:].strip().decode()
                if kind in RESPONSE_TERMINAL:
                    terminal = kind  # the client has its answer; the rest of the body is the connection's end
                    response.read()
                    break
        if not terminal:
            raise OSError("the stream ended without response.completed/failed/incomplete")
        return terminal
    except (http_client.HTTPException, OSError):
        http.close()
        raise


def responses(job: dict[str, Any]) -> dict[str, Any]:
    """``users`` closed-loop users, one session (conversation) each, run ``warmup`` then ``turns`` turns.

    ``path`` "native": the user follows its session's stream (WebSocket, or the long-poll route) and POSTs
    ``/v1/sessions/{id}/turns``; "responses": it POSTs ``/v1/responses`` with ``stream: true`` and
    ``conversation`` and reads OpenAI's SSE to ``response.completed``. After the warm-up turns the
    generator reports ``ready`` and waits for the orchestrator's SIGUSR1 (here the signal to go, so the
    orchestrator's CPU meter covers exactly the measured turns), or ``stop_at``.
    """
    url, keys, agent, path = job["url"], job["keys"], job["agent"], job["path"]
    stop_at = job["stop_at"]
    state = {"warm": 0, "done": 0, "completed": 0, "errors": 0, "ready": 0, "inflight": 0}
    latencies: list[float] = []
    statuses: set[str] = set()
    errors: list[str] = []
    claimed = {"warm": 0, "measured": 0}
    warmed = gevent.event.Event()
    stream_kind = ""
    span = [0.0, 0.0]

    def claim(phase: str, limit: int) -> bool:
        if claimed[phase] >= limit or time.time() >= stop_at:
            return False
        claimed[phase] += 1
        return True

    def user(i: int) -> None:
        nonlocal stream_kind
        key = keys[i % len(keys)]
        http = Http(url, key)
        if path == "native":
            session_id = create_session(http, agent)
            stream = open_stream(url, key, session_id, after=0, prefer=job["stream"])
            stream_kind = stream.kind
            events = stream.events()
        else:
            conversation = http.request("POST", "/v1/conversations", {})["id"]
            stream_kind = "SSE (POST /v1/responses, stream=true)"

        def one() -> str:
            if path == "native":
                turn = start_turn(http, session_id, "hello")
                return next(e["type"] for e in events if e.get("turn_id") == turn["id"] and e["type"] in TERMINAL)
            return _responses_turn(http, conversation, agent, "hello")

        for phase, limit in (("warm", job["warmup"]), ("measured", job["turns"])):
            if phase == "measured":
                warmed.wait(timeout=max(0.0, stop_at - time.time()))
            while claim(phase, limit):
                t0 = time.perf_counter()
                state["inflight"] += 1
                try:
                    status = one()
                except (HttpError, OSError, StopIteration) as exc:
                    state["errors"] += 1
                    if len(errors) < 20:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    gevent.sleep(0.2)
                    continue
                finally:
                    state["inflight"] -= 1
                if phase == "warm":
                    state["warm"] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                statuses.add(status)
                state["done"] += 1
                state["completed"] += status in ("turn.completed", "response.completed")
                span[1] = time.time()
        if path == "native":
            stream.close()
        http.close()

    progress = ticker(0.5, lambda: dict(state))
    pool = gevent.pool.Pool(job["users"])
    for i in range(job["users"]):
        pool.spawn(user, i)
    # Warm: every warm-up turn claimed and none in flight (or the deadline, or every user gave up).
    while (claimed["warm"] < job["warmup"] or state["inflight"]) and time.time() < stop_at and len(pool):
        gevent.sleep(0.05)
    gevent.sleep(0.3)  # the warm-up turns' last events settle
    state["ready"] = 1
    emit("progress", dict(state))
    RELEASE.wait(timeout=max(0.0, stop_at - time.time()))
    span[0], cpu0 = time.time(), time.process_time()
    warmed.set()
    pool.join(timeout=max(0.0, stop_at - time.time()) + 10)
    cpu_used = time.process_time() - cpu0  # the generator exits right after: it reports its own CPU
    pool.kill(block=True, timeout=2)
    progress.kill()
    return {"path": path, "latencies": latencies, "completed": state["completed"], "statuses": sorted(statuses),
            "errors": errors, "error_count": state["errors"], "cpu_seconds": cpu_used,
            "seconds": max(0.0, span[1] - span[0]), "stream": stream_kind}


# --- fan-out: many clients on a few busy sessions ----------------------------------

def fanout(job: dict[str, Any]) -> dict[str, Any]:
    """Count, per half second, the message.delta events clients received until ``run_until``.

    The orchestrator picks the measured window afterwards (it knows when the
    turns really started). A client that lags gets runs of deltas merged into
    one frame carrying the run's last cursor (DESIGN.md section 5,
    backpressure); cursors are consecutive within a session, so the events a
    frame stands for are its cursor minus the previous frame's: ``deltas``
    counts events delivered, ``frames`` what was written to the sockets.
    """
    url, stop_at = job["url"], job["run_until"]
    counts = {"deltas": 0, "frames": 0, "clients": 0, "failed": 0, "reconnects": 0}
    buckets: dict[int, list[int]] = {}  # half-second index -> [deltas, frames, bytes]
    kinds: set[str] = set()

    def client(session_id: str, key: str) -> None:
        last, connected = 0, False
        with gevent.Timeout(max(1.0, stop_at - time.time() + 1), False):
            while time.time() < stop_at:
                try:
                    # A stream the server closed (a lagging client) is resumed from its cursor, as clients must.
                    stream = open_stream(url, key, session_id, after=last or None, prefer=job["stream"])
                except Exception:  # noqa: BLE001 - counted; the scenario reports how many connected
                    counts["failed"] += 1
                    gevent.sleep(0.5)
                    continue
                kinds.add(stream.kind)
                if connected:
                    counts["reconnects"] += 1
                else:
                    counts["clients"] += 1
                    connected = True
                try:
                    for cursor, is_delta, size in _frames(stream):
                        now = time.time()
                        if now > stop_at:
                            break
                        b = buckets.setdefault(int(now * 2), [0, 0, 0])
                        if is_delta:
                            n = cursor - last if last else 1
                            b[0] += n
                            counts["deltas"] += n
                        b[1] += 1
                        b[2] += size
                        counts["frames"] += 1
                        last = cursor
                finally:
                    stream.close()

    progress = ticker(1.0, lambda: dict(counts))
    pool = gevent.pool.Pool()
    for i, (session_id, key) in enumerate(job["sessions"] * job["per_session"]):
        pool.spawn(client, session_id, key)
        if i % 100 == 99:
            gevent.sleep(0.02)
    RELEASE.wait(timeout=max(0.0, stop_at - time.time()))
    pool.kill(block=True, timeout=2)
    progress.kill()
    return {**counts, "buckets": {str(k): v for k, v in buckets.items()}, "stream": ",".join(sorted(kinds))}


def _frames(stream: Any) -> Any:
    """(cursor, is a delta, bytes) per event frame, reading only the frame's head where possible."""
    if stream.kind == "websocket":
        for frame in stream.raw_frames():
            if frame.startswith('{"cursor":'):
                comma = frame.index(",", 10)
                yield int(frame[10:comma]), frame.startswith('"type":"message.delta"', comma + 1), len(frame)
        return
    for page in stream.raw_pages():
        events = json.loads(page)["data"]
        for i, e in enumerate(events):
            yield e["cursor"], e["type"] == "message.delta", len(page) if i == 0 else 0


# --- connections: hold many idle streams open ----------------------------------------

def connections(job: dict[str, Any]) -> dict[str, Any]:
    url = job["url"]
    state = {"open": 0, "failed": 0, "refused": 0, "dropped": 0}
    kinds: set[str] = set()
    errors: list[str] = []

    def hold(session_id: str, key: str) -> None:
        # Refused connections retry with full-jitter backoff (0.5-8 s), as clients in a reconnect storm should.
        backoff = 0.5
        while True:
            try:
                stream = open_stream(url, key, session_id, after=None, prefer=job["stream"], wait=job["wait"])
                break
            except Exception as exc:  # noqa: BLE001 - counted and reported
                state["refused"] += 1
                if len(errors) < 10:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                if time.time() + backoff > job["connect_until"]:
                    state["failed"] += 1
                    return
                gevent.sleep(random.uniform(0, backoff))
                backoff = min(8.0, backoff * 2)
        kinds.add(stream.kind)
        state["open"] += 1
        frames = stream.raw_frames() if stream.kind == "websocket" else stream.raw_pages()  # type: ignore[union-attr]
        with gevent.Timeout(max(0.0, job["hold_until"] - time.time()), False):
            for _ in frames:  # reading answers the server's pings
                pass
            state["dropped"] += 1  # the server ended the stream before the hold time was up
        state["open"] -= 1
        stream.close()

    progress = ticker(1.0, lambda: dict(state))
    pool = gevent.pool.Pool()
    batch = job.get("batch", 200)
    for i, (session_id, key) in enumerate(job["sessions"]):
        pool.spawn(hold, session_id, key)
        if i % batch == batch - 1:
            gevent.sleep(job.get("batch_pause", 0.1))
    opened_at = time.time()
    RELEASE.wait(timeout=max(0.0, job["hold_until"] - time.time()))
    peak = {"open_before_release": state["open"]}
    pool.kill(block=True, timeout=5)
    progress.kill()
    return {**state, **peak, "open_seconds": round(time.time() - opened_at, 1), "stream": ",".join(sorted(kinds)),
            "errors": errors}


JOBS = {"throughput": throughput, "responses": responses, "overhead": overhead, "fanout": fanout,
        "connections": connections}


def main() -> None:
    gevent.signal_handler(signal.SIGUSR1, RELEASE.set)
    job = json.loads(sys.stdin.readline())
    emit("result", JOBS[job["kind"]](job))


if __name__ == "__main__":
    main()
