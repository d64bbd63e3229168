"""`python -m bench.session_growth`: does turn 1,000 of a session cost what turn 1 costs?

On a throwaway database of this machine's Postgres (``STEPRUN_TEST_ADMIN_DATABASE_URL``, as the tests)
and a throwaway key prefix of its Redis, one session of an echo agent (the scripted model, unpaced)
runs ``--turns`` single-step turns one after another, each created as the API creates it
(``create_turn``) and run as a worker runs it (``run_step``, in this process: the queued task itself
goes to a queue no worker reads). Per turn it
records this process's CPU time and the wall time of each half, and the bytes of checkpoint state the
step wrote and the step's load read. It prints those per window of ``--window`` turns (first, middle,
last) and the ratio last/first, so a cost that grows with the session shows as a ratio above 1.

The scripted model's own CPU (it counts the prompt's words, so it grows with the history as a real
provider's request does) is shown apart, and taken out of "the runtime's" figure.

What it leaves out: the web process's HTTP and the Celery hand-off (constant per turn, measured by
``python -m bench --scenarios cost``), and Postgres's own CPU (the bytes stand in for it).
"""
from __future__ import annotations

import argparse
import os
import secrets
import statistics
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Text, create_engine, func, select, text

from shared.agent import Agent, AgentRegistry
from shared.auth.principal import SYSTEM, Principal
from shared.db import make_engine, unit_of_work
from shared.engine.step import build_runtime, run_step
from shared.llm.scripted import ScriptedModel
from shared.migrate import upgrade
from shared.models import Checkpoint
from shared.settings import Settings
from shared.turns import service as turns

ADMIN_URL = os.environ.get("STEPRUN_TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("STEPRUN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass
class TurnCost:
    create_cpu: float
    step_cpu: float
    create_wall: float
    step_wall: float
    written: int  # bytes of checkpoint state the step wrote
    model_cpu: float  # of step_cpu: the scripted model's own (it counts the prompt's words, as a provider would)


def _window(costs: list[TurnCost], start: int, size: int) -> dict[str, float]:
    part = costs[start:start + size]
    return {
        "create CPU ms": statistics.mean(c.create_cpu for c in part) * 1e3,
        "step CPU ms": statistics.mean(c.step_cpu for c in part) * 1e3,
        "  of which the model's": statistics.mean(c.model_cpu for c in part) * 1e3,
        "  the runtime's (step - model)": statistics.mean(c.step_cpu - c.model_cpu for c in part) * 1e3,
        "create wall ms (median)": statistics.median(c.create_wall for c in part) * 1e3,
        "step wall ms (median)": statistics.median(c.step_wall for c in part) * 1e3,
        "checkpoint bytes written per step": statistics.mean(c.written for c in part),
    }


class _ModelClock:
    """Adds up the CPU time the scripted model spends in ``generate`` (on this thread: steps run here)."""

    def __init__(self) -> None:
        self.spent = 0.0
        self._generate = ScriptedModel.generate
        clock = self

        def generate(model: ScriptedModel, *args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return clock._generate(model, *args, **kwargs)
            finally:
                clock.spent += time.thread_time() - started
        ScriptedModel.generate = generate  # type: ignore[method-assign]

    def close(self) -> None:
        ScriptedModel.generate = self._generate  # type: ignore[method-assign]


def run(settings: Settings, n: int, text_size: int) -> list[TurnCost]:
    # The echo agent without its pacing (tokens at once): the runtime's cost is what is measured.
    quick = Agent(name="echo", instructions="Echo.", model="scripted:ttft=0,tps=1000000,words=20")
    rt = build_runtime(settings, agents=AgentRegistry([quick]))
    who = Principal("t-growth", "u-growth")
    costs: list[TurnCost] = []
    model = _ModelClock()
    try:
        with unit_of_work(rt.sessions, who) as db:
            session_id = turns.create_session(db, rt, who, "echo", None).id
        message = ("word " * (text_size // 5 + 1))[:text_size]
        for i in range(n):
            c0, w0 = time.thread_time(), time.perf_counter()
            with unit_of_work(rt.sessions, who) as db:
                turn_id = turns.create_turn(db, rt, who, session_id, f"{i} {message}")[0].id
            c1, w1, m1 = time.thread_time(), time.perf_counter(), model.spent
            status = run_step(rt, turn_id, 0)
            c2, w2 = time.thread_time(), time.perf_counter()
            if status != "completed":
                raise SystemExit(f"turn {i} ended {status}")
            with unit_of_work(rt.sessions, SYSTEM) as db:
                written = db.scalar(select(func.octet_length(func.cast(Checkpoint.state, Text)))
                                    .where(Checkpoint.session_id == session_id)
                                    .order_by(Checkpoint.number.desc()).limit(1)) or 0
            costs.append(TurnCost(c1 - c0, c2 - c1, w1 - w0, w2 - w1, int(written), model.spent - m1))
            if (i + 1) % 100 == 0:
                print(f"  {i + 1} turns", flush=True)
    finally:
        model.close()
        rt.close()
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--text", type=int, default=200, help="characters of each turn's input")
    parser.add_argument("--history-cache", type=int, default=None, metavar="MESSAGES",
                        help="STEPRUN_HISTORY_CACHE_MESSAGES for the run (0: every step reads its history)")
    args = parser.parse_args()
    name = f"steprun_bench_growth_{secrets.token_hex(3)}"
    admin = create_engine(ADMIN_URL.replace("postgresql://", "postgresql+psycopg2://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    tag = secrets.token_hex(3)
    settings = Settings(database_url=ADMIN_URL.rsplit("/", 1)[0] + "/" + name, redis_url=REDIS_URL,
                        redis_prefix=f"steprun-bench-growth-{tag}", queue_name=f"steprun-bench-growth-{tag}",
                        secret_key=secrets.token_hex(32))
    if args.history_cache is not None:
        settings = settings.replace(history_cache_messages=args.history_cache)
    try:
        owner = make_engine(settings)
        upgrade(owner, settings=settings)
        owner.dispose()
        costs = run(settings, args.turns, args.text)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    size = min(args.window, len(costs))
    windows = [("first", 0), ("middle", len(costs) // 2 - size // 2), ("last", len(costs) - size)]
    figures = {label: _window(costs, start, size) for label, start in windows}
    print(f"\none session, {len(costs)} single-step echo turns of {args.text} characters, "
          f"STEPRUN_HISTORY_CACHE_MESSAGES={settings.history_cache_messages}; "
          f"means (and medians) over windows of {size} turns; load average {os.getloadavg()[0]:.2f}")
    width = max(len(k) for k in figures["first"])
    print(f"{'':{width}}  " + "  ".join(f"{label:>10}" for label, _ in windows) + "  last/first")
    for key in figures["first"]:
        first, last = figures["first"][key], figures["last"][key]
        ratio = f"{last / first:10.2f}" if first else f"{'-':>10}"
        print(f"{key:{width}}  " + "  ".join(f"{figures[label][key]:10.2f}" for label, _ in windows) + f"  {ratio}")


if __name__ == "__main__":
    main()
