"""`python -m bench` (or `make bench`): the benchmark suite. See docs/benchmarks.md.

Starts the Procfile topology on this machine's Postgres and Redis (a throwaway
database, its own Redis prefix and queue), drives it from separate load
generator processes over loopback HTTP and WebSocket, prints a progress line
while it runs and one table at the end, and (full runs) rewrites the results
section of docs/benchmarks.md and its plots. Every phase is bounded in time;
every process it starts is killed at the end.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import recovery, report, scenarios
from bench.runner import Loader, Progress
from bench.stack import ROOT, Stack, StackConfig

ALL = ("cost", "connections", "overhead", "responses", "throughput", "fanout", "recovery", "autoscale")
QUICK = dict(cost_seconds=5.0,
             levels="8,32", tools_levels="16", level_seconds=4.0, warmup=1.0, overhead_turns=30, overhead_seconds=6.0,
             fanout_sessions=4, fanout_clients=50, fanout_seconds=4.0, connections=1000, connect_seconds=15.0,
             hold_seconds=2.0, conn_loaders=2, recovery_trials=1, lease=3.0,
             responses_turns=60, responses_concurrency=4, responses_seconds=40.0,
             scenarios="cost,connections,overhead,responses,throughput,fanout,recovery")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="A smaller run (about 2 min); writes no docs.")
    p.add_argument("--scenarios", default=",".join(ALL), help="Comma-separated subset of: " + ", ".join(ALL))
    g = p.add_argument_group("the scripted model")
    g.add_argument("--ttft", type=float, default=0.05, help="Model time to first token, seconds.")
    g.add_argument("--tps", type=float, default=200.0, help="Model tokens per second.")
    g.add_argument("--words", type=int, default=20, help="Words in each answer.")
    g = p.add_argument_group("topology")
    g.add_argument("--workers", type=int, default=2, help="Celery worker processes (gevent pool).")
    g.add_argument("--worker-concurrency", type=int, default=50, help="Greenlets per worker (-c).")
    g.add_argument("--lease", type=float, default=10.0, help="STEPRUN_LEASE_SECONDS (heartbeat: lease/5).")
    g.add_argument("--db-pool", type=int, default=None, metavar="N",
                   help="STEPRUN_DB_POOL_SIZE of the served processes (default: theirs, 10).")
    g.add_argument("--db-overflow", type=int, default=None, metavar="N",
                   help="STEPRUN_DB_MAX_OVERFLOW of the served processes (default: theirs, 10).")
    g.add_argument("--loaders", type=int, default=2, help="Load generator processes (throughput, fan-out).")
    g.add_argument("--stream", choices=("websocket", "long-poll"), default="websocket",
                   help="Streaming client; websocket falls back to long-poll if the route is missing.")
    g.add_argument("--observe", choices=("stream", "turn"), default="stream",
                   help="Throughput users learn a turn ended from their stream, or from GET /v1/turns/{id}?wait=.")
    g.add_argument("--whatif", default="", metavar="FIXES",
                   help="Patch proposed fixes into the served processes (bench/whatif.py): a comma-separated "
                        "subset of redis-pool=N, auth-cache, no-preping. Empty: the code as it is.")
    g.add_argument("--delta-flush", type=float, default=None, metavar="SECONDS",
                   help="STEPRUN_DELTA_FLUSH_SECONDS of the served processes (default: theirs, 0.03 s). Smaller "
                        "makes more events per streaming session: the fan-out's deltas/s is bound by "
                        "clients x events a session makes, so measuring a process's fan-out capacity needs more.")
    g.add_argument("--shared-redis", action="store_true",
                   help="Use --redis-url as it is instead of a private redis-server for the run (then Redis "
                        "command counts include whatever else uses that server).")
    g = p.add_argument_group("durations and sizes")
    g.add_argument("--cost-users", type=int, default=16, help="Users at once in the cost-per-turn scenario.")
    g.add_argument("--cost-seconds", type=float, default=10.0, help="Measured seconds per cost shape.")
    g.add_argument("--levels", default="1,8,32,64,128", help="Throughput concurrency levels.")
    g.add_argument("--tools-levels", default="1,8,32,64", help="Levels for the three-step turns.")
    g.add_argument("--level-seconds", type=float, default=10.0, help="Measured seconds per level.")
    g.add_argument("--warmup", type=float, default=3.0, help="Unmeasured seconds before each level.")
    g.add_argument("--overhead-turns", type=int, default=200)
    g.add_argument("--overhead-seconds", type=float, default=30.0)
    g.add_argument("--responses-turns", type=int, default=300,
                   help="Measured turns per path in the Responses-vs-native scenario.")
    g.add_argument("--responses-concurrency", type=int, default=8, help="Users at once on each path.")
    g.add_argument("--responses-seconds", type=float, default=90.0, help="Longest time for each path's turns.")
    g.add_argument("--fanout-sessions", type=int, default=10, help="Sessions streaming at once.")
    g.add_argument("--fanout-clients", type=int, default=50, help="Clients following each session.")
    g.add_argument("--fanout-seconds", type=float, default=15.0)
    g.add_argument("--connections", type=int, default=5000, help="Idle streams to open against one API process.")
    g.add_argument("--connect-seconds", type=float, default=60.0, help="Longest time to open them.")
    g.add_argument("--connect-rate", type=float, default=200.0,
                   help="New connections a second the clients attempt (refused ones retry with backoff).")
    g.add_argument("--hold-seconds", type=float, default=8.0)
    g.add_argument("--conn-loaders", type=int, default=4)
    g.add_argument("--recovery-trials", type=int, default=3)
    g.add_argument("--autoscale-max", type=int, default=10)
    g.add_argument("--autoscale-min", type=int, default=2)
    g.add_argument("--autoscale-seconds", type=float, default=20.0)
    g = p.add_argument_group("output")
    g.add_argument("--docs", default=None, help="Results file to update (full runs: docs/benchmarks.md).")
    g.add_argument("--no-docs", action="store_true", help="Print only.")
    g.add_argument("--docs-section", default="results",
                   help="Which marked section of the docs file this run replaces (e.g. whatif).")
    g.add_argument("--profile", action="store_true",
                   help="py-spy the API and a worker during the cost scenario, the top throughput level and "
                        "the fan-out.")
    g.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    g.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.level_list = [int(x) for x in args.levels.split(",") if x]
    args.tools_level_list = [int(x) for x in args.tools_levels.split(",") if x]
    args.scenario_list = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenario_list) - set(ALL)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.docs is None and not args.quick and not args.no_docs:
        args.docs = str(ROOT / "docs" / "benchmarks.md")
    return args


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    progress = Progress()
    fanout_words = int(2000 * (opts.fanout_seconds + 20 + opts.fanout_sessions * opts.fanout_clients / 150))
    config = StackConfig(admin_url=opts.admin_url, redis_url=opts.redis_url, workers=opts.workers,
                         worker_concurrency=opts.worker_concurrency, lease_seconds=opts.lease,
                         db_pool=opts.db_pool, db_overflow=opts.db_overflow,
                         web_connections=max(6000, opts.connections + 1000),
                         whatif=opts.whatif, own_redis=not opts.shared_redis and bool(shutil.which("redis-server")),
                         agent_options=dict(ttft=opts.ttft, tps=opts.tps, words=opts.words,
                                            stream_tps=2000.0, stream_words=fanout_words),
                         extra_env={} if opts.delta_flush is None else
                         {"STEPRUN_DELTA_FLUSH_SECONDS": str(opts.delta_flush)})
    results: dict[str, Any] = {"started": time.time(), "machine": report.machine(), "command": command,
                               "options": {k: v for k, v in vars(opts).items() if not k.endswith("_list")}}
    stack = Stack(config)
    t0 = time.monotonic()
    # SIGTERM (make bench stopped, a CI timeout) cleans up like Ctrl-C: processes, database, Redis keys.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGHUP, _interrupted)
    try:
        progress.show("[setup] database, migrations, web + workers + scheduler ...", force=True)
        stack.start()
        opts.stream = scenarios.stream_kind(stack, opts.stream)
        results["stream"] = opts.stream
        progress.done(f"[setup] ready in {time.monotonic() - t0:.1f}s: {stack.url}, {opts.workers} workers, "
                      f"streaming client: {opts.stream}")
        run_scenarios(stack, opts, progress, results)
    except KeyboardInterrupt:
        results["failure"] = "interrupted"
        progress.done("interrupted; stopping every process")
    except Exception:  # noqa: BLE001 - report what was measured, then clean up
        results["failure"] = traceback.format_exc()
        progress.done("a scenario failed:\n" + results["failure"])
        for proc in stack.procs:
            if not proc.alive():
                progress.done(f"{proc.name} exited; its log ends:\n{proc.log()[-1500:]}")
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        Loader.kill_all()
        stack.dispose()
        stack.stop()
    results["seconds"] = round(time.monotonic() - t0, 1)
    print(report.table(results))
    # Every figure (not only the table's), for a closer look or another plot.
    raw = Path(tempfile.gettempdir()) / "steprun-bench-results.json"
    raw.write_text(json.dumps(results, indent=1, default=str))
    print(f"all figures: {raw}")
    if opts.docs and not opts.no_docs and "failure" not in results:
        written = report.write_docs(results, Path(opts.docs), opts.docs_section)
        print("wrote " + ", ".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in written))
    return 1 if "failure" in results else 0


def run_scenarios(stack: Stack, opts: argparse.Namespace, progress: Progress, results: dict[str, Any]) -> None:
    """Each wanted scenario in turn; one that fails is recorded and the others still run."""
    from bench.profile import Profiler

    def throughput() -> list[dict[str, Any]]:
        rows = []
        for agent in ("single", "tools"):
            levels = opts.level_list if agent == "single" else opts.tools_level_list
            if opts.profile and agent == "single":
                rows += scenarios.throughput(stack, opts, progress, agent, levels[:-1])
                with Profiler(stack, "throughput", opts.level_seconds + opts.warmup + 2) as prof:
                    rows += scenarios.throughput(stack, opts, progress, agent, levels[-1:])
                results.setdefault("profiles", []).extend(prof.summaries())
            else:
                rows += scenarios.throughput(stack, opts, progress, agent, levels)
        return rows

    def fanout() -> dict[str, Any]:
        if not opts.profile:
            return scenarios.fanout(stack, opts, progress)
        with Profiler(stack, "fanout", opts.fanout_seconds + 10) as prof:
            out = scenarios.fanout(stack, opts, progress)
        results.setdefault("profiles", []).extend(prof.summaries())
        return out

    def cost() -> list[dict[str, Any]]:
        if not opts.profile:
            return scenarios.cost(stack, opts, progress)
        # Its four shapes one after another (each warmed up, then measured), in one profile per process.
        with Profiler(stack, "cost", 4 * (opts.warmup + opts.cost_seconds + 2)) as prof:
            out = scenarios.cost(stack, opts, progress)
        results.setdefault("profiles", []).extend(prof.summaries())
        return out

    run = {"cost": cost,
           "connections": lambda: scenarios.connections(stack, opts, progress),
           "overhead": lambda: scenarios.overhead(stack, opts, progress),
           "responses": lambda: scenarios.responses(stack, opts, progress),
           "throughput": throughput, "fanout": fanout,
           "recovery": lambda: recovery.recovery(stack, opts, progress),
           "autoscale": lambda: recovery.autoscale(stack, opts, progress)}
    for name in ALL:
        if name not in opts.scenario_list:
            continue
        try:
            results[name] = run[name]()
        except Exception:  # noqa: BLE001 - report it with the figures of the scenarios that did run
            results.setdefault("failures", {})[name] = traceback.format_exc()
            progress.done(f"[{name}] FAILED:\n{results['failures'][name][-2500:]}")
            dead = [p for p in stack.procs if not p.alive()]
            for proc in dead:
                progress.done(f"{proc.name} exited; its log ends:\n{proc.log()[-1500:]}")
            if stack.web is None or not stack.web.alive():
                raise


if __name__ == "__main__":
    sys.exit(main())
