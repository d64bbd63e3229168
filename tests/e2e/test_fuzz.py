"""Schemathesis fuzzes every operation of /openapi.json against a real web process.

It checks that nothing answers 5xx and that every response matches the
documented schema, status codes, content types and headers. Requests the API
rejects by its own rules (an unknown agent, a cursor that is not yours) are
legitimate 4xx, so the "schema-valid data must be accepted" check is left out.
"""
from __future__ import annotations

import re
import subprocess

from shared.auth.keys import create_key
from shared.auth.principal import SYSTEM
from shared.db import unit_of_work
from shared.runtime import Runtime
from tests.support.processes import BIN, Procs, settings_env

MAX_EXAMPLES = 25


def test_fuzz_finds_no_server_error_and_no_schema_violation(procs: Procs, rt: Runtime) -> None:
    env = settings_env(procs.settings)
    # Fuzzing is a flood by design, with one key (and requests without it).
    env.update(STEPRUN_RATE_LIMIT_PER_MINUTE="0", STEPRUN_RATE_LIMIT_PER_KEY="0", STEPRUN_RATE_LIMIT_PER_TENANT="0",
               STEPRUN_AUTH_FAILURES_PER_IP="0")
    # Long-polls end before the fuzzer's 10 s read timeout (a longer ?wait= is a legitimate 400).
    env["STEPRUN_MAX_WAIT_SECONDS"] = "5"
    procs.worker(env=env)
    _, url = procs.web(env=env)
    with unit_of_work(rt.sessions, SYSTEM) as db:  # keys: the system path
        _, key = create_key(db, "t-fuzz", "u-fuzz")
    out = subprocess.run(
        [str(BIN / "schemathesis"), "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {key}",
         "--max-examples", str(MAX_EXAMPLES), "-w", "1", "--seed", "1", "--checks", "all",
         "--exclude-checks", "positive_data_acceptance", "--no-color",
         # An SSE stream never ends, so a request/response fuzzer can only time out on it
         # (tests/e2e/test_streaming.py covers it).
         "--exclude-path-regex", r"/events/stream$"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    summary = out.stdout[-4000:]
    (procs.log_dir / "schemathesis.txt").write_text(out.stdout)
    cases = re.search(r"(\d+) generated", out.stdout)
    print(f"schemathesis: {cases.group(0) if cases else '?'} cases")
    assert out.returncode == 0, summary + out.stderr[-2000:]
    assert cases and int(cases.group(1)) > 100, summary
