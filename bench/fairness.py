"""`python -m bench.fairness`: how long one user's short turn waits while another user fills the workers.

The red-team's case: one user starts ``--hog-turns`` long turns (``--hog-seconds`` each) on a fleet
of ``--concurrency`` worker slots, then another user of the same tenant starts one short turn. For
each ``STEPRUN_MAX_RUNNING_TURNS_PER_USER`` in ``--caps`` (0: no cap, the old behaviour) it starts
the Procfile topology afresh and prints the short turn's time from POST to completed, and how many
of the hog's turns were running when it was sent. The hog's turns are cancelled once the short one is done.
"""
from __future__ import annotations

import argparse
import time

import requests

from bench.stack import Stack, StackConfig


def measure(cap: int, hog_turns: int, hog_seconds: float, concurrency: int) -> dict[str, float]:
    tps = 100.0
    config = StackConfig(workers=1, worker_concurrency=concurrency,
                         agent_options=dict(ttft=0.05, tps=200.0, words=20, stream_words=int(tps * hog_seconds),
                                            stream_tps=tps),
                         extra_env={"STEPRUN_MAX_RUNNING_TURNS_PER_USER": str(cap)})
    stack = Stack(config).start()
    try:
        (_, hog), (_, other) = stack.users(2)

        def start(key: str, agent: str, text: str) -> str:
            h = {"Authorization": f"Bearer {key}"}
            sid = requests.post(f"{stack.url}/v1/sessions", json={"agent": agent}, headers=h, timeout=10).json()["id"]
            r = requests.post(f"{stack.url}/v1/sessions/{sid}/turns", json={"input": text}, headers=h, timeout=10)
            r.raise_for_status()
            return str(r.json()["id"])

        hogs = [start(hog, "stream", f"long {i}") for i in range(hog_turns)]
        time.sleep(1.0)  # the hog's turns are claimed (or deferred)
        h = {"Authorization": f"Bearer {hog}"}
        running = sum(requests.get(f"{stack.url}/v1/turns/{t}", headers=h, timeout=10).json()["status"]
                      == "in_progress" for t in hogs)
        t0 = time.monotonic()
        quick = start(other, "single", "quick")
        done = requests.get(f"{stack.url}/v1/turns/{quick}?wait=60", headers={"Authorization": f"Bearer {other}"},
                            timeout=70).json()
        waited = time.monotonic() - t0
        for t in hogs:
            requests.post(f"{stack.url}/v1/turns/{t}/cancel", headers=h, timeout=10)
        return {"cap": cap, "quick_seconds": waited, "quick_status_ok": float(done["status"] == "completed"),
                "hog_running": running}
    finally:
        stack.stop()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__.split("\n\n")[0])
    p.add_argument("--hog-turns", type=int, default=10)
    p.add_argument("--hog-seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=10, help="Worker slots (one worker process, -c).")
    p.add_argument("--caps", default="0,4", help="STEPRUN_MAX_RUNNING_TURNS_PER_USER values to compare.")
    args = p.parse_args()
    rows = [measure(int(c), args.hog_turns, args.hog_seconds, args.concurrency) for c in args.caps.split(",")]
    print(f"\none user's {args.hog_turns} turns of {args.hog_seconds:g} s on {args.concurrency} worker slots, "
          "then another user's short turn:")
    print(f"{'cap per user':>14} {'short turn, POST to completed':>32} {'hog turns running':>18}")  # at its POST
    for r in rows:
        cap = "none" if not r["cap"] else str(int(r["cap"]))
        ok = "" if r["quick_status_ok"] else " (not completed)"
        print(f"{cap:>14} {r['quick_seconds']:>30.2f} s{ok} {int(r['hog_running']):>18}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
