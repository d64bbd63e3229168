"""Queue latency (shared/stats.py): what `steprun stats`, /metrics and the KEDA trigger report."""
from __future__ import annotations

import secrets

from sqlalchemy import text

from api.app import create_app
from shared.auth.principal import SYSTEM
from shared.db import set_scope
from shared.runtime import Runtime
from shared.stats import queue_stats


def _waiting_turn(rt: Runtime, seconds_ago: int) -> tuple[str, str]:
    """A turn sent to the workers ``seconds_ago`` and not claimed, written as the worker would find it."""
    sid, tid = f"ses_{secrets.token_hex(12)}", f"turn_{secrets.token_hex(12)}"
    with rt.engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, created_at) VALUES (:t, now()) ON CONFLICT DO NOTHING"),
                     {"t": "t-stats"})
        conn.execute(text(
            "INSERT INTO sessions (id, tenant_id, user_id, agent, metadata, active_turn_id, turn_count, created_at,"
            " updated_at) VALUES (:s, 't-stats', 'u-stats', 'math', '{}', :t, 1, now(), now())"), {"s": sid, "t": tid})
        conn.execute(text(
            "INSERT INTO turns (id, session_id, tenant_id, user_id, seq, status, input, on_busy, output, usage,"
            " step_count, step_attempt, attempt, cancel_requested, created_at, enqueued_at) VALUES (:t, :s,"
            " 't-stats', 'u-stats', 1, 'queued', 'hi', 'enqueue', '', '{}', 0, 0, 0, false, now(),"
            " now() - make_interval(secs => :ago))"), {"t": tid, "s": sid, "ago": seconds_ago})
    return sid, tid


def _delete(rt: Runtime, sid: str) -> None:
    with rt.engine.begin() as conn:
        conn.execute(text("DELETE FROM sessions WHERE id = :s"), {"s": sid})


def test_queue_stats_sees_every_tenants_waiting_step(rt: Runtime) -> None:
    sid, _ = _waiting_turn(rt, 600)
    try:
        # Through the runtime's own sessions, on the system path (the owner's login, every tenant).
        with rt.sessions() as db:
            stats = queue_stats(set_scope(db, SYSTEM))
        assert stats.waiting >= 1 and stats.oldest_wait_seconds >= 600
        # The application's login, unscoped, sees no tenant's turn (it can no longer declare itself the system).
        with rt.sessions() as db:
            assert queue_stats(db).waiting == 0
    finally:
        _delete(rt, sid)


def test_metrics_carry_the_queue_gauges(rt: Runtime) -> None:
    sid, _ = _waiting_turn(rt, 900)
    try:
        body = create_app(rt.settings, runtime=rt).test_client().get("/metrics").get_data(as_text=True)
        gauges = {line.split()[0]: float(line.split()[1]) for line in body.splitlines()
                  if line.startswith("steprun_queue_") and not line.startswith("steprun_queue_latency")}
        assert gauges["steprun_queue_oldest_wait_seconds"] >= 900
        assert gauges["steprun_queue_waiting_steps"] >= 1
    finally:
        _delete(rt, sid)
