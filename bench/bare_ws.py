"""Baseline for the connections figure: what an idle WebSocket costs with no steprun code at all.

``python -m bench.bare_ws [N]`` serves a bare flask-sock route (it only waits
for the client to close) from gunicorn with the Procfile's worker class and
settings, opens N idle WebSockets to it with the same load generator as the
benchmark's connections scenario, and prints the RSS per connection. The
difference from ``python -m bench --scenarios connections`` is what steprun's
stream adds per connection (docs/benchmarks.md).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from flask import Flask
from flask_sock import Sock

from bench.runner import Loader
from bench.stack import BIN, Proc, free_port, rss_bytes

app = Flask(__name__)
sock = Sock(app)


@app.get("/healthz")
def healthz() -> str:
    return "ok"


@sock.route("/v1/sessions/<session_id>/ws")
def idle(ws, session_id):  # type: ignore[no-untyped-def]
    while ws.receive() is not None:
        pass


def main(n: int) -> None:
    import os

    from bench.stack import Stack, _children

    port, tmp = free_port(), Path(tempfile.mkdtemp(prefix="steprun-bare-ws-"))
    env = dict(os.environ, STEPRUN_WORKER_CONNECTIONS=str(n + 1000), WEB_CONCURRENCY="1", PORT=str(port),
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    web = Proc("bare-web", [str(BIN / "gunicorn"), "bench.bare_ws:app", "-c", "python:api.gunicorn_conf",
                            "-b", f"127.0.0.1:{port}"], env, tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        Stack._wait_http(f"{url}/healthz", web)
        pid = _children(web.pid)[0]
        time.sleep(0.5)
        rss0 = rss_bytes(pid)
        parts = [n // 4 + (1 if i < n % 4 else 0) for i in range(4)]
        loaders, start = [], 0
        for size in parts:
            loaders.append(Loader(dict(kind="connections", url=url, stream="websocket", wait=55.0,
                                       sessions=[[f"s{i}", "none"] for i in range(start, start + size)],
                                       hold_until=time.time() + 120, batch=100, batch_pause=0.1,
                                       connect_until=time.time() + 80)))
            start += size
        deadline = time.time() + 90
        while time.time() < deadline and sum(ld.progress.get("open", 0) + ld.progress.get("failed", 0)
                                             for ld in loaders) < n:
            time.sleep(0.5)
        time.sleep(2)
        held = sum(ld.progress.get("open", 0) for ld in loaders)
        rss1 = rss_bytes(pid)
        for ld in loaders:
            ld.release()
        for ld in loaders:
            ld.wait(30)
        print(f"bare flask-sock: {held} idle WebSockets held; RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB = "
              f"{(rss1 - rss0) / 1024 / max(held, 1):.1f} KiB per connection")
    finally:
        web.kill()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
