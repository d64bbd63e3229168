"""`python -m bench.scope`: what the signed row-level-security scope costs, per transaction and per statement.

On a throwaway database of this machine's Postgres (``STEPRUN_TEST_ADMIN_DATABASE_URL``, as the tests), with
the migrations applied and the application login created, one client:

- *transaction*: the median of ``--n`` transactions of each kind, interleaved (so load on the machine weighs
  on all alike): entering a principal's scope (``steprun_enter``: HMAC checked, counter advanced) with
  ``SELECT 1``; the statement it replaced (four ``set_config`` and ``SET ROLE``) with ``SELECT 1``; ``SELECT 1``
  alone on the owner's system path; a primary-key read of ``sessions`` under the policies, and as the owner;
- *server*: the mean cost inside Postgres, ``--n`` calls in one statement or DO block (one round trip):
  ``steprun_enter``, the old settings, ``steprun_scope()`` (what each policy reads, once per statement),
  and the primary-key read under the policies against the owner's (no policies);
- *connect*: a new connection of the application login (``steprun_open()`` included) against the owner's.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import secrets
import statistics
import time
from collections.abc import Callable

from sqlalchemy import create_engine, text

from shared.auth.principal import SYSTEM, Principal
from shared.db import make_engine, make_sessionmaker, unit_of_work
from shared.engine.step import build_runtime
from shared.migrate import upgrade
from shared.runtime import Runtime
from shared.settings import Settings

ADMIN_URL = os.environ.get("STEPRUN_TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
OLD = ("SELECT set_config('steprun.tenant_id', %(t)s, true), set_config('steprun.user_id', %(u)s, true), "
       "set_config('steprun.system', '', true), set_config('steprun.admin_tenant_id', '', true), "
       "set_config('role', %(r)s, true)")


def _median_us(n: int, fn: Callable[[], object]) -> float:
    for _ in range(min(50, n)):
        fn()  # warm the pool, the plans and the caches
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def _server_side(rt: Runtime, who: Principal, n: int) -> dict[str, float]:
    """Microseconds per call inside Postgres: ``n`` calls in one statement (or one DO block), one round trip."""
    out: dict[str, float] = {}
    raw = rt.app_engine.raw_connection()  # type: ignore[union-attr]
    try:
        cur, key = raw.cursor(), raw.info["steprun_scope_key"]
        first = raw.info["steprun_scope_seq"] + 1
        scope = f"{who.tenant_id}\x1f{who.user_id}\x1f\x1f"
        ns = list(range(first, first + n))
        macs = [hmac.new(key, f"{i}\x1f{scope}".encode(), hashlib.sha256).hexdigest() for i in ns]
        t0 = time.perf_counter()
        cur.execute("SELECT count(steprun_enter(u.n, %s, u.m)) FROM unnest(%s::bigint[], %s::text[]) "
                    "WITH ORDINALITY AS u(n, m, o)", (scope, ns, macs))
        out["enter"] = (time.perf_counter() - t0) / n * 1e6
        raw.info["steprun_scope_seq"] = first + n - 1
        t0 = time.perf_counter()
        cur.execute("SELECT count(steprun_scope('tenant_id') || g::text) FROM generate_series(1, %s) g", (n,))
        out["scope"] = (time.perf_counter() - t0) / n * 1e6
        loop = (f"DO $$ BEGIN FOR i IN 1..{n} LOOP PERFORM agent FROM sessions WHERE id = 'ses_bench'; END LOOP; "
                "END $$")
        t0 = time.perf_counter()
        cur.execute(loop)
        out["read_app"] = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        cur.execute("SELECT count(set_config('steprun.tenant_id', 't' || g, true) || set_config('steprun.user_id', "
                    "'u', true) || set_config('steprun.system', '', true) || set_config('steprun.admin_tenant_id', "
                    "'', true) || set_config('role', 'steprun_app', true)) FROM generate_series(1, %s) g", (n,))
        out["settings"] = (time.perf_counter() - t0) / n * 1e6
        raw.rollback()
    finally:
        raw.invalidate()
    with rt.engine.connect() as conn:
        t0 = time.perf_counter()
        conn.exec_driver_sql(loop.replace("%", "%%"))
        out["read_owner"] = (time.perf_counter() - t0) / n * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="repetitions per figure")
    args = parser.parse_args()
    name = f"steprun_bench_scope_{secrets.token_hex(3)}"
    admin = create_engine(ADMIN_URL.replace("postgresql://", "postgresql+psycopg2://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    settings = Settings(database_url=ADMIN_URL.rsplit("/", 1)[0] + "/" + name)
    try:
        owner = make_engine(settings)
        upgrade(owner, settings=settings)  # the schema and the application login, as `steprun migrate`
        owner.dispose()
        rt = build_runtime(settings)
        who = Principal("t-bench", "u-bench")
        with unit_of_work(rt.sessions, SYSTEM) as db:
            db.execute(text("INSERT INTO tenants (id, created_at) VALUES ('t-bench', now())"))
            db.execute(text("INSERT INTO sessions (id, tenant_id, user_id, agent, metadata, turn_count, created_at, "
                            "updated_at) VALUES ('ses_bench', 't-bench', 'u-bench', 'x', '{}', 0, now(), now())"))
        assert rt.app_engine is not None
        plain = make_sessionmaker(rt.app_engine)  # the application's login, without the scope statement

        def enter() -> None:
            with unit_of_work(rt.sessions, who) as db:
                db.execute(text("SELECT 1"))

        def settings_statement() -> None:
            with unit_of_work(plain) as db:
                db.connection().exec_driver_sql(OLD, {"t": who.tenant_id, "u": who.user_id, "r": "steprun_app"})
                db.execute(text("SELECT 1"))

        def bare() -> None:
            with unit_of_work(rt.sessions, SYSTEM) as db:
                db.execute(text("SELECT 1"))

        read = text("SELECT agent FROM sessions WHERE id = 'ses_bench'")

        def policy_read() -> None:
            with unit_of_work(rt.sessions, who) as db:
                assert db.execute(read).scalar_one() == "x"

        def owner_read() -> None:
            with unit_of_work(rt.sessions, SYSTEM) as db:
                assert db.execute(read).scalar_one() == "x"

        def open_app() -> None:
            rt.app_engine.connect().close()  # type: ignore[union-attr]
            rt.app_engine.dispose()  # type: ignore[union-attr]

        def open_owner() -> None:
            rt.engine.connect().close()
            rt.engine.dispose()

        # Client-side, one transaction each, the variants interleaved so that load on the machine hits all alike.
        variants = {"enter": enter, "settings": settings_statement, "bare": bare, "policy": policy_read,
                    "owner": owner_read}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for fn in variants.values():
            for _ in range(50):
                fn()
        for _ in range(args.n):
            for k, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        server = _server_side(rt, who, args.n)
        rows = [
            ("transaction: enter + SELECT 1 (app login)", med["enter"]),
            ("transaction: old set_config x4 + SET ROLE + SELECT 1", med["settings"]),
            ("transaction: SELECT 1 (owner, no scope statement)", med["bare"]),
            ("transaction: enter + pk read of sessions (policies)", med["policy"]),
            ("transaction: pk read of sessions (owner, no policies)", med["owner"]),
            ("server: steprun_enter, per call", server["enter"]),
            ("server: old set_config x4 + role, per call", server["settings"]),
            ("server: steprun_scope(), per call", server["scope"]),
            ("server: pk read of sessions under the policies", server["read_app"]),
            ("server: pk read of sessions as the owner", server["read_owner"]),
            ("connect: new app connection (steprun_open included)", _median_us(max(20, args.n // 100), open_app)),
            ("connect: new owner connection", _median_us(max(20, args.n // 100), open_owner)),
        ]
        rt.close()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    width = max(len(r[0]) for r in rows)
    print(f"{'one client; transactions and connects: medians; server: means':{width}}  µs")
    for label, us in rows:
        print(f"{label:{width}}  {us:8.1f}")


if __name__ == "__main__":
    main()
