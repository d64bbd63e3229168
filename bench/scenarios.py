"""The load scenarios: throughput, overhead to first delta, Responses vs native, fan-out, connections.

Each takes the running :class:`~bench.stack.Stack` and the parsed options, runs
load generators (bench/load.py) in separate processes against the one API
process over loopback, and returns a dict of figures for bench/report.py.
Recovery and autoscaling, which kill and start workers, are in bench/recovery.py.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from bench.client import Http, HttpError, create_session, start_turn, websocket_available
from bench.counters import ServerCounters, per
from bench.runner import CpuMeter, Loader, Progress, percentile, watch
from bench.stack import Stack, rss_bytes


def split(n: int, parts: int) -> list[int]:
    parts = max(1, min(parts, n))
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def stream_kind(stack: Stack, prefer: str) -> str:
    """"websocket" if the deployment serves WS /v1/sessions/{id}/ws, else "long-poll"."""
    if prefer != "websocket":
        return "long-poll"
    http = Http(stack.url, stack.key)
    session_id = create_session(http, "single")
    http.close()
    return "websocket" if websocket_available(stack.url, stack.key, session_id) else "long-poll"


def process_groups(stack: Stack, loaders: list[Loader]) -> dict[str, Any]:
    """Whose CPU to count: the API process, workers, this run's Postgres backends, Redis, load generators."""
    api, redis_pid = [stack.api_pid()], stack.redis_pid()
    return {"api": lambda: api, "workers": lambda: [w.pid for w in stack.workers],
            "postgres": stack.pg_backend_pids, "redis": lambda: redis_pid,
            "loaders": lambda: [ld.popen.pid for ld in loaders]}


class QueueSampler:
    """Samples shared.stats.queue_stats twice a second; keeps the worst oldest-wait seen."""

    def __init__(self, stack: Stack, enabled: bool = True):
        self.stack = stack
        self.enabled = enabled
        self.max_oldest = 0.0
        self.max_waiting = 0
        self.p95: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> QueueSampler:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from sqlalchemy.orm import Session

        from shared.stats import queue_stats

        while not self._stop.wait(0.5):
            try:
                with Session(self.stack.engine()) as db:
                    s = queue_stats(db, window_seconds=10)
            except Exception:  # noqa: BLE001 - a missed sample is not a failed benchmark
                continue
            self.max_oldest = max(self.max_oldest, s.oldest_wait_seconds)
            self.max_waiting = max(self.max_waiting, s.waiting)
            if s.start_delay_p95_seconds is not None:
                self.p95 = s.start_delay_p95_seconds


def throughput(stack: Stack, opts: Any, progress: Progress, agent: str, levels: list[int],
               observe: str | None = None, sample_queue: bool = True,
               seconds: float | None = None) -> list[dict[str, Any]]:
    """Closed loop: ``c`` users, each on its own session, start a turn as soon as the last one ended.

    ``observe``: "stream" (each user follows its session's stream and waits there for the turn's end)
    or "turn" (the polling shape: POST the turn, then long-poll ``GET /v1/turns/{id}?wait=``);
    default ``opts.observe``. ``sample_queue``: read the queue's latency twice a second (a few
    transactions of its own, left out where transactions per turn are the figure).
    """
    observe = observe or opts.observe
    seconds = seconds or opts.level_seconds
    rows = []
    for c in levels:
        setup = 2.0 + c * 0.02
        start_at = time.time() + setup
        measure_from = start_at + opts.warmup
        stop_at = measure_from + seconds
        keys = [k for _, k in stack.users(c)]
        jobs, first = [], 0
        for n in split(c, opts.loaders):
            jobs.append(dict(kind="throughput", url=stack.url, keys=keys[first:first + n], agent=agent, users=n,
                             start_at=start_at, measure_from=measure_from, stop_at=stop_at, observe=observe,
                             stream=opts.stream, drain=20.0))
            first += n
        loaders = [Loader(j) for j in jobs]
        meter = CpuMeter(process_groups(stack, loaders))
        label = f"throughput {agent} c={c}" + ("" if observe == "stream" else " (polling)")
        watch(loaders, measure_from, label, progress, lambda t: f"warming up, {int(t.get('done', 0))} turns")
        meter.start()
        servers = ServerCounters(stack).start()
        with QueueSampler(stack, enabled=sample_queue) as queue:
            done0 = time.time()
            watch(loaders, stop_at, label, progress,
                  lambda t: f"{int(t.get('done', 0))} turns  errors={int(t.get('errors', 0))}")
            cpu = meter.stop()
            counts = servers.stop()
        results = [ld.wait(timeout=max(0.0, stop_at - time.time()) + 40) for ld in loaders]
        latencies = [x for r in results for x in r["latencies"]]
        completed = sum(r["completed"] for r in results)
        row = dict(agent=agent, concurrency=c, seconds=seconds, completed=completed,
                   turns_per_s=round(completed / seconds, 1), p50=percentile(latencies, 50),
                   p99=percentile(latencies, 99), errors=sum(r["error_count"] for r in results),
                   error_samples=[e for r in results for e in r["errors"]][:3],
                   statuses=sorted({s for r in results for s in r["statuses"]}),
                   stream=results[0]["stream"], queue_oldest_max=round(queue.max_oldest, 3),
                   # CPU per completed turn, per process type: what scales with more processes.
                   **{f"{k}_ms_per_turn": round(v / max(completed, 1) * 1000, 1) for k, v in meter.used.items()},
                   queue_start_p95=queue.p95, per_turn=per(counts, completed), observe=observe, **cpu)
        progress.done(f"[{label}] {row['turns_per_s']} turns/s  p50={_ms(row['p50'])}  p99={_ms(row['p99'])}  "
                      f"errors={row['errors']}  cpu: {_cpu(cpu)}  queue-oldest-max={row['queue_oldest_max']}s"
                      f"  (measured {time.time() - done0:.0f}s)")
        rows.append(row)
        time.sleep(1.0)
    return rows


COST_AGENTS = (("echo", "1-step"), ("echo_tool", "tool"))
COST_SHAPES = (("stream", "websocket"), ("turn", "polling"))


def cost(stack: Stack, opts: Any, progress: Progress) -> list[dict[str, Any]]:
    """What one turn costs: the echo agents (no model time) at ``cost_users`` users, on both client shapes.

    The WebSocket shape (each user follows its session's stream) and the polling shape (POST the
    turn, long-poll ``GET /v1/turns/{id}?wait=``); a single-step turn and a tool turn (a tool call,
    then the answer) on each. Per turn: CPU-ms per process type, Postgres transactions (the run's
    database), Redis commands. bench/report.py checks them against the targets.
    """
    rows = []
    for observe, shape in COST_SHAPES:
        for agent, kind in COST_AGENTS:
            for row in throughput(stack, opts, progress, agent, [opts.cost_users], observe=observe,
                                  sample_queue=False, seconds=opts.cost_seconds):
                row.update(shape=shape, kind=kind)
                pt = row["per_turn"]
                progress.done(f"[cost {kind} {shape}] per turn: web {row['api_ms_per_turn']} + worker "
                              f"{row['workers_ms_per_turn']} CPU-ms (Postgres {row['postgres_ms_per_turn']}, "
                              f"Redis {row['redis_ms_per_turn']}); {pt.get('pg_transactions')} transactions, "
                              f"{pt.get('redis_calls')} Redis commands {_top(pt.get('redis_commands'))}")
                rows.append(row)
    return rows


def _top(commands: dict[str, float] | None, n: int = 8) -> dict[str, float]:
    """The ``n`` most sent commands (the counters keep them all, most sent first)."""
    return dict(list((commands or {}).items())[:n])


def overhead(stack: Stack, opts: Any, progress: Progress) -> dict[str, Any]:
    """POST .../turns to the first message.delta at a streaming client, minus the model's own first token."""
    model_first_token = opts.ttft + (1.0 / opts.tps if opts.tps else 0.0)
    stop_at = time.time() + opts.overhead_seconds + 5
    loader = Loader(dict(kind="overhead", url=stack.url, key=stack.key, agent="single", stream=opts.stream,
                         turns=opts.overhead_turns, stop_at=stop_at, pause=0.05))
    watch([loader], stop_at, "overhead", progress, lambda t: f"{int(t.get('done', 0))} turns")
    r = loader.wait(timeout=max(0.0, stop_at - time.time()) + 30)
    over = [x - model_first_token for x in r["first_delta"]]
    out = dict(turns=len(over), p50=percentile(over, 50), p99=percentile(over, 99), max=max(over, default=None),
               post_p50=percentile(r["post_rtt"], 50), model_first_token=model_first_token, stream=r["stream"],
               errors=r["errors"])
    progress.done(f"[overhead] {out['turns']} turns via {out['stream']}: p50={_ms(out['p50'])} "
                  f"p99={_ms(out['p99'])} (POST itself p50={_ms(out['post_p50'])}; model first token "
                  f"{model_first_token * 1000:.0f} ms subtracted)")
    return out


def responses(stack: Stack, opts: Any, progress: Progress) -> dict[str, Any]:
    """The same N single-step streamed turns through the native path and through POST /v1/responses.

    Native: each user follows its session's stream and POSTs a turn; Responses: each user POSTs
    ``/v1/responses`` with ``stream: true`` on its own conversation and reads OpenAI's SSE to
    ``response.completed``. Same agent, same users, same concurrency, one path after the other;
    the CPU meter covers only the measured turns (the generator warms up, then waits for the go).
    """
    c, n = opts.responses_concurrency, opts.responses_turns
    keys = [k for _, k in stack.users(c)]
    out: dict[str, Any] = dict(concurrency=c, turns=n, paths={})
    for path in ("native", "responses"):
        label = f"responses: {path} c={c}"
        stop_at = time.time() + opts.responses_seconds + 30
        loader = Loader(dict(kind="responses", url=stack.url, keys=keys, agent="single", users=c, path=path,
                             turns=n, warmup=max(10, 2 * c), stop_at=stop_at, stream=opts.stream))
        watch([loader], stop_at, label, progress, lambda t: f"warming up, {int(t.get('warm', 0))} turns",
              stop_when=lambda t: bool(t.get("ready")))
        if not loader.progress.get("ready"):
            raise RuntimeError(f"[{label}] the load generator did not warm up:\n{loader.stderr[-2000:]}")
        meter = CpuMeter(process_groups(stack, [loader])).start()
        servers = ServerCounters(stack).start()
        loader.release()  # go: the measured turns start now
        watch([loader], min(stop_at, time.time() + opts.responses_seconds), label, progress,
              lambda t: f"{int(t.get('done', 0))}/{n} turns  errors={int(t.get('errors', 0))}",
              stop_when=lambda t: t.get("done", 0) + t.get("errors", 0) >= n)
        cpu, counts = meter.stop(), servers.stop()  # every measured turn has ended
        r = loader.wait(timeout=max(0.0, stop_at - time.time()) + 15)
        done = len(r["latencies"])
        # The generator has usually exited before the meter reads it; it measured its own CPU.
        meter.used["loaders"] = r["cpu_seconds"]
        cpu["loaders_cpu_pct"] = round(100 * r["cpu_seconds"] / max(r["seconds"], 1e-9), 1)
        cpu["other_cpu_pct"] = round(max(0.0, cpu["other_cpu_pct"] - cpu["loaders_cpu_pct"]), 1)
        row = dict(path=path, turns=done, completed=r["completed"], seconds=round(r["seconds"], 2),
                   turns_per_s=round(done / r["seconds"], 1) if r["seconds"] else None,
                   p50=percentile(r["latencies"], 50), p99=percentile(r["latencies"], 99),
                   errors=r["error_count"], error_samples=r["errors"][:3], statuses=r["statuses"],
                   stream=r["stream"],
                   # CPU-seconds each group used over the measured turns, per turn, in ms.
                   **{f"{k}_ms_per_turn": round(v / max(done, 1) * 1000, 2) for k, v in meter.used.items()},
                   per_turn=per(counts, done), **cpu)
        progress.done(f"[{label}] {done} turns via {row['stream']}: {row['turns_per_s']} turns/s  "
                      f"p50={_ms(row['p50'])}  p99={_ms(row['p99'])}  errors={row['errors']}  CPU per turn: "
                      f"web={row['api_ms_per_turn']} ms  worker={row['workers_ms_per_turn']} ms  "
                      f"postgres={row['postgres_ms_per_turn']} ms  redis={row['redis_ms_per_turn']} ms  "
                      f"load generator={row['loaders_ms_per_turn']} ms  "
                      f"(machine busy {cpu['machine_busy_pct']}%)")
        out["paths"][path] = row
        time.sleep(1.0)
    native, compat = out["paths"]["native"], out["paths"]["responses"]
    out["web_ms_overhead"] = round(compat["api_ms_per_turn"] - native["api_ms_per_turn"], 2)
    out["worker_ms_overhead"] = round(compat["workers_ms_per_turn"] - native["workers_ms_per_turn"], 2)
    if native["p50"] is not None and compat["p50"] is not None:
        out["p50_overhead"] = compat["p50"] - native["p50"]
    progress.done(f"[responses] Responses over native, per turn: web {out['web_ms_overhead']:+} ms CPU, "
                  f"worker {out['worker_ms_overhead']:+} ms CPU, p50 to the terminal event "
                  f"{_ms(out.get('p50_overhead'))}")
    return out


def fanout(stack: Stack, opts: Any, progress: Progress) -> dict[str, Any]:
    """``sessions`` sessions stream fast at once; ``per_session`` clients follow each one."""
    # One end user per session (its followers are that user's tabs and devices).
    sessions = []
    for _, key in stack.users(opts.fanout_sessions):
        owner = Http(stack.url, key)
        sessions.append((create_session(owner, "stream"), key))
        owner.close()
    clients = opts.fanout_sessions * opts.fanout_clients
    turns_at = time.time() + 5.0 + clients / 150
    # A bound only: the generators are released as soon as the window is measured.
    run_until = turns_at + 2.0 + opts.fanout_seconds + 120.0
    loaders = [Loader(dict(kind="fanout", url=stack.url, sessions=sessions, per_session=n,
                           stream=opts.stream, run_until=run_until))
               for n in split(opts.fanout_clients, opts.loaders)]
    watch(loaders, turns_at, "fan-out", progress,
          lambda t: f"connecting {int(t.get('clients', 0))}/{clients}  failed={int(t.get('failed', 0))}")
    connected = sum(int(ld.progress.get("clients", 0)) for ld in loaders)
    posted = time.time()
    turn_ids = [_start_turn_retrying(Http(stack.url, key), sid) for sid, key in sessions]
    posted = time.time() - posted
    # The window starts once every session streams, and lasts fanout_seconds.
    measure_from = time.time() + 2.0
    measure_to = measure_from + opts.fanout_seconds
    time.sleep(max(0.0, measure_from - time.time()))
    meter = CpuMeter(process_groups(stack, loaders)).start()
    servers = ServerCounters(stack).start()
    watch(loaders, measure_to, "fan-out", progress,
          lambda t: f"{int(t.get('deltas', 0))} deltas to {int(t.get('clients', 0))} clients, "
                    f"{int(t.get('reconnects', 0))} reconnects")
    cpu = meter.stop()
    counts = servers.stop()
    for ld in loaders:
        ld.release()
    for turn_id, (_, key) in zip(turn_ids, sessions, strict=True):
        try:
            Http(stack.url, key).request("POST", f"/v1/turns/{turn_id}/cancel")
        except Exception:  # noqa: BLE001 - the turn may have ended; the next scenario does not depend on it
            pass
    results = [ld.wait(timeout=30) for ld in loaders]
    seconds = measure_to - measure_from
    lo, hi = int(measure_from * 2), int(measure_to * 2)
    window = [v for r in results for k, v in r["buckets"].items() if lo <= int(k) < hi]
    deltas, frames, size = (sum(v[i] for v in window) for i in range(3))
    out = dict(sessions=opts.fanout_sessions, clients=clients, connected=connected, seconds=round(seconds, 1),
               deltas=deltas, deltas_per_s=round(deltas / seconds), frames_per_s=round(frames / seconds),
               mb_per_s=round(size / seconds / 1e6, 2), per_client_per_s=round(deltas / max(connected, 1) / seconds, 1),
               post_turns_seconds=round(posted, 2), reconnects=sum(r["reconnects"] for r in results),
               failed=sum(r["failed"] for r in results),
               # CPU the API process spent per event delivered: the figure that scales (docs/scaling.md).
               api_us_per_delta=round(cpu["api_cpu_pct"] / 100 * seconds / deltas * 1e6, 1) if deltas else None,
               api_us_per_frame=round(cpu["api_cpu_pct"] / 100 * seconds / frames * 1e6, 1) if frames else None,
               stream=",".join(sorted({r["stream"] for r in results if r["stream"]})),
               per_delta=per(counts, deltas), **cpu)
    progress.done(f"[fan-out] {out['deltas_per_s']} deltas/s to {connected} clients ({out['stream']}) over "
                  f"{seconds:.1f}s; {out['frames_per_s']} frames/s, {out['mb_per_s']} MB/s; {out['reconnects']} "
                  f"reconnects; starting the turns took {posted:.1f}s; API {out['api_us_per_delta']} us CPU/delta; "
                  f"cpu: {_cpu(cpu)}")
    return out


def _start_turn_retrying(http: Http, session_id: str, tries: int = 10) -> str:
    """Start a turn, retrying a 503 (the API answers it while its Redis pool is exhausted)."""
    for attempt in range(tries):
        try:
            return start_turn(http, session_id, "stream please")["id"]
        except HttpError as exc:
            if exc.status != 503 or attempt == tries - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def connections(stack: Stack, opts: Any, progress: Progress) -> dict[str, Any]:
    """Open ``connections`` idle streams, one per session, and weigh the API process."""
    n = opts.connections
    sessions = stack.seed_sessions("single", n)
    pid = stack.api_pid()
    Http(stack.url, stack.key).request("GET", "/v1/agents")  # the app is loaded and has served before we weigh it
    time.sleep(0.5)
    rss0 = rss_bytes(pid)
    ramp = opts.connect_seconds
    hold_until = time.time() + ramp + opts.hold_seconds + 30  # a bound; the loaders are released earlier
    parts = split(n, opts.conn_loaders)
    loaders, i = [], 0
    for size in parts:
        loaders.append(Loader(dict(kind="connections", url=stack.url, sessions=sessions[i:i + size],
                                   stream=opts.stream, hold_until=hold_until, wait=55.0,
                                   batch=max(1, int(opts.connect_rate / len(parts) / 4)), batch_pause=0.25,
                                   connect_until=time.time() + ramp)))
        i += size
    t0 = time.time()
    total = watch(loaders, t0 + ramp, "connections", progress,
                  lambda t: f"open {int(t.get('open', 0))}/{n}  refused (retrying)={int(t.get('refused', 0))}  "
                            f"gave up={int(t.get('failed', 0))}",
                  stop_when=lambda t: t.get("open", 0) + t.get("failed", 0) >= n)
    ramp_s = time.time() - t0
    time.sleep(2.0)  # let the last handshakes settle before weighing
    meter = CpuMeter({"api": lambda: [pid]}).start()
    watch(loaders, time.time() + opts.hold_seconds, "connections", progress,
          lambda t: f"holding {int(t.get('open', 0))}  dropped={int(t.get('dropped', 0))}")
    cpu = meter.stop()
    held = sum(int(ld.progress.get("open", 0)) for ld in loaders)
    rss1 = rss_bytes(pid)
    for ld in loaders:
        ld.release()
    results = [ld.wait(timeout=30) for ld in loaders]
    out = dict(target=n, held=held, failed=sum(r["failed"] for r in results),
               refused=sum(r["refused"] for r in results),
               dropped=sum(r["dropped"] for r in results), ramp_seconds=round(ramp_s, 1),
               opened_per_s=round(total.get("open", 0) / ramp_s) if ramp_s else None,
               rss_before_mb=round(rss0 / 2**20, 1), rss_held_mb=round(rss1 / 2**20, 1),
               kib_per_connection=round((rss1 - rss0) / 1024 / held, 1) if held else None,
               idle_api_cpu_pct=cpu["api_cpu_pct"],
               stream=",".join(sorted({r["stream"] for r in results if r["stream"]})),
               errors=[e for r in results for e in r["errors"]][:5])
    progress.done(f"[connections] held {held}/{n} ({out['stream']}), RSS {out['rss_before_mb']} -> "
                  f"{out['rss_held_mb']} MiB = {out['kib_per_connection']} KiB/connection; "
                  f"ramp {out['ramp_seconds']}s; {out['refused']} refusals retried, {out['failed']} gave up, "
                  f"{out['dropped']} dropped")
    return out


def _cpu(cpu: dict[str, float]) -> str:
    return " ".join(f"{k.replace('_cpu_pct', '').replace('_pct', '')}={v:g}%" for k, v in cpu.items())


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}ms"
