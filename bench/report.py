"""The results table, the machine description, docs/benchmarks.md's results section and its plots."""
from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("gunicorn", "gevent", "greenlet", "flask", "flask-sock", "simple-websocket", "celery", "kombu",
            "redis", "sqlalchemy", "psycopg2-binary", "websocket-client")
# Per turn (issue 15): CPU-ms summed over web and worker, Postgres transactions, Redis commands.
COST_TARGETS = {"1-step": dict(cpu_ms=13.0, pg_transactions=5, redis_calls=25),
                "tool": dict(cpu_ms=30.0, pg_transactions=9, redis_calls=None)}
COST_RATE = dict(turns_per_s=100.0, p50=0.150)  # single-step turns at 16 users, full Procfile topology
TARGETS = dict(turns_per_s=150.0, overhead_p50=0.010, overhead_p99=0.050, deltas_per_s=50_000,
               connections=5000, kib_per_connection=50.0)


def machine() -> dict[str, Any]:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    return dict(nproc=os.cpu_count(), memory_gib=round(mem / 2**30, 1), cpu=cpu, kernel=platform.release(),
                python=platform.python_version(), packages=versions, postgres=_run(["psql", "-h", "127.0.0.1",
                "-U", "postgres", "-Atc", "SHOW server_version"]), redis=_redis_version(),
                loadavg_at_start=open("/proc/loadavg").read().split()[:3])


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().split(" ")[0]
    except (OSError, subprocess.SubprocessError):
        return "?"


def _redis_version() -> str:
    try:
        text = subprocess.run(["redis-cli", "-h", "127.0.0.1", "INFO", "server"], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    m = re.search(r"redis_version:(\S+)", text)
    return m.group(1) if m else "?"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def _yes(ok: bool | None) -> str:
    return "-" if ok is None else ("**yes**" if ok else "**no**")


def cost_checks(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(what, measured, met) for each target a cost row is held to."""
    t = COST_TARGETS[r["kind"]]
    pt = r.get("per_turn") or {}
    cpu = round(r.get("api_ms_per_turn", 0) + r.get("workers_ms_per_turn", 0), 1)
    checks = [(f"web+worker ≤ {t['cpu_ms']:g} CPU-ms", f"{cpu:g} CPU-ms", cpu <= t["cpu_ms"]),
              (f"≤ {t['pg_transactions']} Postgres transactions", f"{pt.get('pg_transactions', '-')} transactions",
               pt.get("pg_transactions", 1e9) <= t["pg_transactions"])]
    if t["redis_calls"] is not None:
        checks.append((f"≤ {t['redis_calls']} Redis commands", f"{pt.get('redis_calls', '-')} Redis commands",
                       pt.get("redis_calls", 1e9) <= t["redis_calls"]))
    if r["kind"] == "1-step":
        checks.append((f"≥ {COST_RATE['turns_per_s']:g} turns/s", f"{r['turns_per_s']} turns/s",
                       r["turns_per_s"] >= COST_RATE["turns_per_s"]))
        checks.append((f"p50 < {COST_RATE['p50'] * 1000:g} ms", f"p50 {_ms(r['p50'])}",
                       r["p50"] is not None and r["p50"] < COST_RATE["p50"]))
    return checks


def rows(results: dict[str, Any]) -> list[list[str]]:
    out: list[list[str]] = []
    for r in results.get("cost") or []:
        checks = cost_checks(r)
        note = f" ({r['errors']} errors)" if r["errors"] else ""
        out.append([f"cost per turn, {r['kind']}", f"c={r['concurrency']}, {r['shape']}",
                    f"{r['turns_per_s']} turns/s{note}; CPU-ms web {r['api_ms_per_turn']}, worker "
                    f"{r['workers_ms_per_turn']}, Postgres {r['postgres_ms_per_turn']}; "
                    f"{(r.get('per_turn') or {}).get('pg_transactions', '-')} xact, "
                    f"{(r.get('per_turn') or {}).get('redis_calls', '-')} Redis cmds",
                    _ms(r["p50"]), _ms(r["p99"]),
                    "; ".join(what for what, _, _ in checks),
                    " ".join(("yes" if ok else "NO") for _, _, ok in checks)])
    tp = results.get("throughput") or []
    for agent in ("single", "tools"):
        levels = [r for r in tp if r["agent"] == agent]
        best = max(levels, key=lambda r: r["turns_per_s"], default=None)
        for r in levels:
            steps = "1-step" if agent == "single" else "3-step"
            target = "≥ 150 turns/s" if agent == "single" and r is best else ""
            met = _yes(r["turns_per_s"] >= TARGETS["turns_per_s"]) if target else ""
            note = f" ({r['errors']} errors)" if r["errors"] else ""
            out.append([f"throughput {steps}", f"c={r['concurrency']}", f"{r['turns_per_s']} turns/s{note}",
                        _ms(r["p50"]), _ms(r["p99"]), target, met])
    o = results.get("overhead")
    if o:
        met = None if o["p50"] is None else (
            o["p50"] <= TARGETS["overhead_p50"] and o["p99"] <= TARGETS["overhead_p99"])
        out.append(["overhead to 1st delta", f"1 client, {o['turns']} turns, {o['stream']}",
                    f"POST alone p50 {_ms(o['post_p50'])}", _ms(o["p50"]), _ms(o["p99"]),
                    "≤ 10 ms p50, ≤ 50 ms p99", _yes(met)])
    rs = results.get("responses")
    for path, r in (rs or {}).get("paths", {}).items():
        name = "Responses stream (SSE)" if path == "responses" else "native stream"
        note = f", {r['errors']} errors" if r["errors"] else ""
        out.append([f"{name}, 1-step", f"c={rs['concurrency']}, {r['turns']} turns{note}",
                    f"{r['turns_per_s']} turns/s; CPU/turn web {r['api_ms_per_turn']} ms, "
                    f"worker {r['workers_ms_per_turn']} ms", _ms(r["p50"]), _ms(r["p99"]), "", ""])
    f = results.get("fanout")
    if f:
        out.append(["fan-out (1 API process)", f"{f['sessions']} sessions × {f['clients'] // f['sessions']} "
                    f"clients, {f['stream']}", f"{f['deltas_per_s']:,} deltas/s in {f['frames_per_s']:,} frames/s "
                    f"({f['mb_per_s']} MB/s)", "", "",
                    "≥ 50,000 deltas/s", _yes(f["deltas_per_s"] >= TARGETS["deltas_per_s"])])
    c = results.get("connections")
    if c:
        kib = c["kib_per_connection"]
        met = c["held"] >= TARGETS["connections"] and kib is not None and kib <= TARGETS["kib_per_connection"]
        out.append(["connections (1 API process)", f"{c['target']} idle {c['stream']}",
                    f"{c['held']} held, {kib} KiB each", "", "", "≥ 5,000 at ≤ 50 KiB", _yes(met)])
    r = results.get("recovery")
    if r:
        met = None if r["max"] is None else (r["max"] <= r["target"] and not r["missed"])
        out.append(["recovery after SIGKILL", f"{len(r['trials'])} kills, lease {r['lease']:g} s",
                    f"step.retrying after max {r['max']} s (mean {r['mean']} s)", "", "",
                    f"≤ lease + 2 s = {r['target']:g} s", _yes(met)])
    for name, error in (results.get("failures") or {}).items():
        out.append([name, "FAILED", error.strip().splitlines()[-1][:90], "", "", "", "**no**"])
    a = results.get("autoscale")
    if a:
        out.append(["celery --autoscale (gevent, prefetch 1)", f"--autoscale={a['max']},{a['min']}, "
                    f"{a['sent']} steps sent", f"peak {a['peak_running']} running: "
                    f"{'grew' if a['grew'] else 'did not grow'}", "", "", "", ""])
    return out


def table(results: dict[str, Any]) -> str:
    head = ["scenario", "load", "result", "p50", "p99", "target", "met"]
    body = rows(results)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"  # noqa: E731
    text = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]
    return "\n".join(text) + f"\n\n({results.get('seconds', '?')} s, streaming client: {results.get('stream', '?')})"


def detail(results: dict[str, Any]) -> str:
    tp = results.get("throughput") or []
    if not tp:
        return ""
    out = ["| turn | c | turns/s | p50 | p99 | errors | API | workers | Postgres | Redis | load gen. | others "
           "| machine busy | oldest queued step |", "|---" * 14 + "|"]
    for r in tp:
        cpu = " | ".join(f"{r.get(k + '_cpu_pct', '-')}%" for k in ("api", "workers", "postgres", "redis",
                                                                    "loaders", "other"))
        out.append(f"| {r['agent']} | {r['concurrency']} | {r['turns_per_s']} | {_ms(r['p50'])} | {_ms(r['p99'])} | "
                   f"{r['errors']} | {cpu} | {r['machine_busy_pct']}% | {r['queue_oldest_max']} s |")
    return "\n".join(out)


def plots(results: dict[str, Any], folder: Path) -> list[Path]:
    tp = results.get("throughput") or []
    if not tp:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    for name, draw in (("bench-throughput.png", _draw_throughput), ("bench-latency.png", _draw_latency)):
        fig, ax = plt.subplots(figsize=(6, 3.4), dpi=90)
        draw(ax, tp)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["concurrency"] for r in tp}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("concurrent users (closed loop)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, pil_kwargs={"optimize": True})
        plt.close(fig)
        written.append(path)
    return written


def _draw_throughput(ax: Any, tp: list[dict[str, Any]]) -> None:
    for agent, label in (("single", "1-step turns"), ("tools", "3-step turns (2 tool calls)")):
        pts = [(r["concurrency"], r["turns_per_s"]) for r in tp if r["agent"] == agent]
        if pts:
            ax.plot(*zip(*pts, strict=False), marker="o", label=label)
    ax.axhline(TARGETS["turns_per_s"], color="grey", ls="--", lw=1, label="target: 150 turns/s")
    ax.set_ylabel("sustained turns/s")
    ax.set_title("Throughput against concurrency", fontsize=10)


def _draw_latency(ax: Any, tp: list[dict[str, Any]]) -> None:
    for agent, label in (("single", "1-step"), ("tools", "3-step")):
        pts = [(r["concurrency"], r["p50"], r["p99"]) for r in tp if r["agent"] == agent and r["p50"]]
        if pts:
            c, p50, p99 = zip(*pts, strict=False)
            line, = ax.plot(c, [x * 1000 for x in p50], marker="o", label=f"{label} p50")
            ax.plot(c, [x * 1000 for x in p99], marker="^", ls="--", color=line.get_color(), label=f"{label} p99")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(round(v))[0] in "2356" else ""))
    ax.set_ylabel("turn latency, ms (POST to turn.completed)")
    ax.set_title("Turn latency against concurrency", fontsize=10)


def section(results: dict[str, Any], images: list[Path]) -> str:
    m = results["machine"]
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results["started"]))
    parts = [
        f"Run {when}, {results['seconds']} s. Command: `{results['command'].strip()}` (`make bench` runs "
        "`python -m bench`; pass flags with `make bench BENCH_ARGS=...`).",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}, load average at "
        f"start {' '.join(m['loadavg_at_start'])}; Python {m['python']}, PostgreSQL {m['postgres']}, "
        f"Redis {m['redis']}; {pk}.",
        "",
        table(results),
        "",
    ]
    for paragraph in details(results):
        parts += [paragraph, ""]
    if images:
        parts += [" ".join(f"![{p.stem}]({p.name})" for p in images), ""]
    if detail(results):
        parts += ["Throughput in detail. CPU columns are percent of one core over the measured window (API: "
                  "the one gunicorn worker process; Postgres: the backends of the run's database; Redis is "
                  "shared with anything else on the machine; others: everything not started by the run); "
                  "machine busy is percent of all cores.", "", detail(results), ""]
    for prof in results.get("profiles", []):
        if "error" in prof:
            parts += [f"Profile {prof['label']}/{prof['process']}: {prof['error']}", ""]
            continue
        parts += [f"Profile during {prof['label']}, {prof['process']} process ({prof['samples']} py-spy samples). "
                  "On CPU itself (self):", ""]
        parts += [f"- {pct}% {frame}" for frame, pct in prof["self_top"][:8]]
        parts += ["", "Under these steprun functions (inclusive):", ""]
        ours = [(f, pct) for f, pct in prof["ours_inclusive"] if _in_repo(f)]
        parts += [f"- {pct}% {frame}" for frame, pct in ours[:8]]
        parts += [""]
    return "\n".join(parts)


def _in_repo(frame: str) -> bool:
    """A profile frame of steprun's own code (gunicorn has a workers/ folder too)."""
    path = frame.rsplit(" (", 1)[-1].rstrip(")")
    return (Path(__file__).resolve().parent.parent / path).is_file()


def details(results: dict[str, Any]) -> list[str]:
    """The figures behind the table's other rows, one paragraph each."""
    out = []
    o = results.get("overhead")
    if o:
        out.append(f"Overhead: {o['turns']} turns one after another; POST to first `message.delta` at the "
                   f"client minus the model's own first token ({o['model_first_token'] * 1000:.0f} ms); "
                   f"p50 {_ms(o['p50'])}, p99 {_ms(o['p99'])}, worst {_ms(o['max'])}; the `POST` alone (202 "
                   f"received) p50 {_ms(o['post_p50'])}.")
    rs = results.get("responses")
    if rs and {"native", "responses"} <= set(rs.get("paths", {})):
        n, r = rs["paths"]["native"], rs["paths"]["responses"]
        out.append(f"Responses vs native: {rs['concurrency']} users, the same single-step turns, {n['turns']} "
                   f"native ({n['stream']}) then {r['turns']} through `POST /v1/responses` with `stream: true` "
                   f"read to `response.completed`; CPU per turn web {n['api_ms_per_turn']} → "
                   f"{r['api_ms_per_turn']} ms, worker {n['workers_ms_per_turn']} → {r['workers_ms_per_turn']} ms, "
                   f"Postgres {n['postgres_ms_per_turn']} → {r['postgres_ms_per_turn']} ms, Redis "
                   f"{n['redis_ms_per_turn']} → {r['redis_ms_per_turn']} ms; Postgres transactions per turn "
                   f"{n['per_turn'].get('pg_transactions', '-')} → {r['per_turn'].get('pg_transactions', '-')}.")
    f = results.get("fanout")
    if f:
        out.append(f"Fan-out: {f['clients']} WebSocket clients on {f['sessions']} sessions streaming at 2,000 "
                   f"tokens/s each, measured over {f['seconds']} s; {f['deltas_per_s']:,} deltas/s delivered in "
                   f"{f['frames_per_s']:,} frames/s (lagging clients get runs of deltas merged); "
                   f"{f['per_client_per_s']} deltas/s per client; API process CPU {f['api_cpu_pct']}% = "
                   f"{f['api_us_per_delta']} µs per delivered delta, {f['api_us_per_frame']} µs per frame; "
                   f"{f['reconnects']} reconnects after the server closed a lagging client, {f['failed']} failed "
                   f"connection attempts; starting the {f['sessions']} turns took {f['post_turns_seconds']} s; "
                   f"Redis {f['per_delta'].get('redis_calls', '-')} commands and "
                   f"{f['per_delta'].get('redis_usec', '-')} µs per delivered delta.")
    c = results.get("connections")
    if c:
        out.append(f"Connections: {c['held']} of {c['target']} idle WebSockets open at once (one session each, 20 "
                   f"sessions per user); opened at {c['opened_per_s']}/s over {c['ramp_seconds']} s with "
                   f"{c['refused']} refusals retried and {c['dropped']} closed by the server while held; API "
                   f"process RSS {c['rss_before_mb']} → {c['rss_held_mb']} MiB; CPU while idle "
                   f"{c['idle_api_cpu_pct']}% of a core.")
    r = results.get("recovery")
    if r:
        trials = ", ".join(f"{t['retrying_after']} s" for t in r["trials"])
        out.append(f"Recovery: lease {r['lease']:g} s, heartbeat {r['heartbeat']:g} s, scheduler sweep every "
                   f"{r['sweep_interval']:g} s; SIGKILL of the worker process group holding the step to the "
                   f"client receiving `step.retrying`: {trials}; the resumed stream's first delta followed within "
                   f"0.1 s.")
    a = results.get("autoscale")
    if a:
        timeline = ", ".join(f"{t:g} s: {n}" for t, n in a["timeline"])
        out.append(f"Autoscale: one worker `-P gevent --autoscale={a['max']},{a['min']}` (prefetch 1, late acks), "
                   f"{a['sent']} long steps sent at once; steps running: {timeline}.")
    return out


def write_docs(results: dict[str, Any], path: Path, name: str = "results") -> list[Path]:
    """Replace section ``name`` of ``path`` (between its markers) and redraw its plots next to it."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    images = plots(results, path.parent) if name == "results" else []  # plots for the main run only
    generated = start + "\n" + section(results, images) + "\n" + end
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start in text and end in text:
        text = text[: text.index(start)] + generated + text[text.index(end) + len(end):]
    else:
        text += "\n" + generated + "\n"
    path.write_text(text)
    return [path, *images]
