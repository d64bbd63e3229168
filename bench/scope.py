"""`python -m bench.scope`: what the signed row-level-security scope costs, per transaction and per statement.

On a throwaway database of this machine's Postgres (``STEPRUN_TEST_ADMIN_DATABASE_URL``, as the tests), with
the migrations applied and the application login created, it times, one client, sequentially:

- ``enter``: a transaction that enters a principal's scope (``steprun_enter``, the HMAC checked, the counter
  advanced) and runs ``SELECT 1``: the application's path;
- ``settings``: the same transaction with the statement it replaced (four ``set_config`` and ``SET ROLE``);
- ``bare``: ``SELECT 1`` in a transaction with no scope statement at all (the owner's system path);
- ``policy``: a primary-key read of ``sessions`` under the policies, against the same read as the owner
  (no policies): what the once-per-statement ``steprun_scope()`` lookups add;
- ``open``: a new connection of the application login, ``steprun_open()`` included, against one of the owner.

Figures are medians in microseconds over ``--n`` repetitions (loopback TCP).
"""
from __future__ import annotations

import argparse
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

        rows = [
            ("enter (steprun_enter + SELECT 1)", _median_us(args.n, enter)),
            ("settings (set_config x4 + SET ROLE + SELECT 1)", _median_us(args.n, settings_statement)),
            ("bare (SELECT 1, owner)", _median_us(args.n, bare)),
            ("policy read (pk, app login, scoped)", _median_us(args.n, policy_read)),
            ("owner read (pk, no policies)", _median_us(args.n, owner_read)),
            ("open (new app connection + steprun_open)", _median_us(max(20, args.n // 50), open_app)),
            ("open (new owner connection)", _median_us(max(20, args.n // 50), open_owner)),
        ]
        rt.close()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    width = max(len(r[0]) for r in rows)
    print(f"{'per transaction, one client, median':{width}}  µs")
    for label, us in rows:
        print(f"{label:{width}}  {us:8.1f}")


if __name__ == "__main__":
    main()
