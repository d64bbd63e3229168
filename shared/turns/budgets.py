"""Budgets: what a user and a tenant may spend, checked before each model call and when a turn is created.

Limits (all off by default, shared/settings.py):

- tokens (input + output) per UTC day and per UTC month, per user and per tenant;
- model calls and tool executions per turn.

Spending is counted in ``usage_counters`` (one row per user and period), updated in
the transaction that records each model response and each tool start, so the
check before the next model call sees every call that finished before it. A turn
over budget ends ``incomplete`` with error code ``budget``; creating a turn while
a token budget is spent answers 429 with the time it resets.

Concurrency: token checks of one tenant are serialised (a transaction-scoped
advisory lock on Postgres, a process lock on SQLite) with the recording of
usage. A call may start when the budget has room for it and every call already in
flight, each counted at the largest call of the period (``max_call_tokens``);
otherwise, when nothing else is in flight, it may start as the last call before
the line; otherwise it waits for the calls in flight. So however many processes
spend at once, a budget is overshot by at most one call (no larger than the
largest call seen before it in the period).
"""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import DateTime, and_, bindparam, func, select, text
from sqlalchemy.orm import Session

from shared.auth.principal import Principal
from shared.clock import aware, utcnow
from shared.db import serialise, write_later
from shared.models import ModelCall, ToolCall, Turn, UsageCounter
from shared.settings import Settings

PERIODS = ("day", "month")
ADJECTIVE = {"day": "daily", "month": "monthly"}
_COLLECTOR_LOCK = threading.Lock()


class BudgetExceeded(Exception):  # noqa: N818 - reads as the event it is
    """A budget is spent: the turn ends incomplete (or is not created)."""

    def __init__(self, budget: str, used: int, limit: int, resets_at: datetime | None, message: str):
        super().__init__(message)
        self.budget, self.used, self.limit, self.resets_at, self.message = budget, used, limit, resets_at, message

    def as_error(self) -> dict[str, Any]:
        """The turn's ``error`` (and the ``budget.exceeded`` event's data)."""
        return {"code": "budget", "message": self.message, "budget": self.budget, "used": self.used,
                "limit": self.limit, "resets_at": iso(self.resets_at) if self.resets_at else None}


class BudgetBusy(Exception):  # noqa: N818
    """The budget is nearly spent and other calls are in flight: wait for them, then check again."""


def iso(value: datetime) -> str:
    return aware(value).isoformat().replace("+00:00", "Z")


def period_start(period: str, now: datetime) -> datetime:
    now = aware(now).astimezone(timezone.utc)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


def period_end(period: str, start: datetime) -> datetime:
    if period == "day":
        return start + timedelta(days=1)
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)


def token_limits(settings: Settings) -> list[tuple[str, str, int]]:
    """(scope, period, limit) of every token budget that is set."""
    limits = [("user", "day", settings.budget_user_tokens_per_day),
              ("user", "month", settings.budget_user_tokens_per_month),
              ("tenant", "day", settings.budget_tenant_tokens_per_day),
              ("tenant", "month", settings.budget_tenant_tokens_per_month)]
    return [(scope, period, limit) for scope, period, limit in limits if limit > 0]


def lock_tenant(db: Session, tenant_id: str) -> None:
    """Serialise budget checks and usage records of one tenant until ``db``'s transaction ends."""
    serialise(db, f"steprun-budget:{tenant_id}")


def _spent(db: Session, who: Principal, scope: str, period: str, now: datetime) -> tuple[int, int]:
    """Tokens spent in the current period by the user (or the whole tenant), and the largest single call."""
    start = period_start(period, now)
    clauses = [UsageCounter.tenant_id == who.tenant_id, UsageCounter.period == period,
               UsageCounter.starts_at == start]
    if scope == "user":
        clauses.append(UsageCounter.user_id == who.user_id)
    row = db.execute(select(func.coalesce(func.sum(UsageCounter.tokens), 0),
                            func.coalesce(func.max(UsageCounter.max_call_tokens), 0)).where(*clauses)).one()
    return int(row[0]), int(row[1])


def _in_flight(db: Session, who: Principal, scope: str, turn_id: str, now: datetime) -> int:
    """Model calls of the user (or tenant) running now: started, not recorded, their attempt's lease alive."""
    clauses = [ModelCall.tenant_id == who.tenant_id, ModelCall.status == "started", ModelCall.turn_id != turn_id,
               Turn.lease_expires_at > now]
    if scope == "user":
        clauses.append(ModelCall.user_id == who.user_id)
    query = select(func.count()).select_from(ModelCall).join(
        Turn, and_(Turn.id == ModelCall.turn_id, Turn.attempt == ModelCall.attempt)).where(*clauses)
    return int(db.scalar(query) or 0)


def _scope_name(scope: str, period: str) -> str:
    return f"{scope}_tokens_per_{period}"


def _spent_message(scope: str, period: str, used: int, limit: int, resets: datetime) -> str:
    return (f"the {scope}'s {ADJECTIVE[period]} token budget is spent ({used} of {limit}); "
            f"it resets at {iso(resets)}")


def check_tokens_spent(db: Session, settings: Settings, who: Principal, now: datetime | None = None) -> None:
    """Raise :class:`BudgetExceeded` if a token budget of ``who`` is spent (``db``: the system scope)."""
    now = now or utcnow()
    for scope, period, limit in token_limits(settings):
        used, _ = _spent(db, who, scope, period, now)
        if used >= limit:
            resets = period_end(period, period_start(period, now))
            raise BudgetExceeded(_scope_name(scope, period), used, limit, resets,
                                 _spent_message(scope, period, used, limit, resets))


def check_before_model_call(db: Session, settings: Settings, who: Principal, turn_id: str,
                            now: datetime | None = None) -> None:
    """Everything that must hold before a model call starts; raises BudgetExceeded or BudgetBusy.

    ``db`` is a system-scoped transaction holding :func:`lock_tenant` (a tenant's
    total crosses users).
    """
    now = now or utcnow()
    if settings.budget_model_calls_per_turn > 0:
        calls = int(db.scalar(select(func.coalesce(func.sum(ModelCall.calls), 0))
                              .where(ModelCall.turn_id == turn_id)) or 0)
        if calls >= settings.budget_model_calls_per_turn:
            raise BudgetExceeded("model_calls_per_turn", calls, settings.budget_model_calls_per_turn, None,
                                 f"the turn made its {calls} model calls "
                                 f"(STEPRUN_BUDGET_MODEL_CALLS_PER_TURN={settings.budget_model_calls_per_turn})")
    check_tool_calls(db, settings, turn_id)
    for scope, period, limit in token_limits(settings):
        used, largest = _spent(db, who, scope, period, now)
        resets = period_end(period, period_start(period, now))
        if used >= limit:
            raise BudgetExceeded(_scope_name(scope, period), used, limit, resets,
                                 _spent_message(scope, period, used, limit, resets))
        flying = _in_flight(db, who, scope, turn_id, now)
        if flying and used + (flying + 1) * max(largest, 1) > limit:
            raise BudgetBusy(f"{flying} calls in flight near the {scope}'s {period}ly token budget")


def check_tool_calls(db: Session, settings: Settings, turn_id: str) -> None:
    """Raise BudgetExceeded if the turn has used its tool executions."""
    if settings.budget_tool_calls_per_turn <= 0:
        return
    runs = int(db.scalar(select(func.coalesce(func.sum(ToolCall.runs), 0)).where(ToolCall.turn_id == turn_id)) or 0)
    if runs >= settings.budget_tool_calls_per_turn:
        raise BudgetExceeded("tool_calls_per_turn", runs, settings.budget_tool_calls_per_turn, None,
                             f"the turn ran its {runs} tool calls "
                             f"(STEPRUN_BUDGET_TOOL_CALLS_PER_TURN={settings.budget_tool_calls_per_turn})")


def dialect_insert(db: Session) -> Any:
    """The INSERT with ON CONFLICT of ``db``'s dialect (Postgres, or SQLite in embedded mode)."""
    if db.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]  # same API, other dialect
    return insert


def count(db: Session, who: Principal, *, tokens: int = 0, model_calls: int = 0, tool_calls: int = 0,
          now: datetime | None = None) -> None:
    """Add to ``who``'s counters of the current day and month (one upsert of both rows: concurrent adds all
    count)."""
    now = now or utcnow()
    dialect = db.get_bind().dialect.name
    stmt = _COUNT.get(dialect)
    if stmt is None:
        stmt = _COUNT[dialect] = _count_statement(dialect)
    write_later(db, stmt, {"p_tenant_id": who.tenant_id, "p_user_id": who.user_id,
                           "p_day": period_start("day", now), "p_month": period_start("month", now),
                           "p_tokens": tokens, "p_model_calls": model_calls, "p_tool_calls": tool_calls,
                           "p_max_call_tokens": tokens if model_calls else 0, "p_now": now})


# The upsert of :func:`count`, per dialect: built once (a Core statement on the table, no ORM), so each
# count only binds its values.
_COUNT: dict[str, Any] = {}


def _count_statement(dialect: str) -> Any:
    # Text, not a Core INSERT: a two-row VALUES built by Core is compiled anew at every execution (not
    # cacheable), and an executemany of one row's upsert is two statements. Typed binds, so timestamps are
    # stored as the DateTime columns store them (SQLite compares them as text).
    columns = "tenant_id, user_id, period, starts_at, tokens, model_calls, tool_calls, max_call_tokens, updated_at"
    rows = ", ".join(f"(:p_tenant_id, :p_user_id, '{period}', :p_{period}, :p_tokens, :p_model_calls, :p_tool_calls, "
                     ":p_max_call_tokens, :p_now)" for period in PERIODS)
    greatest = "greatest" if dialect == "postgresql" else "max"
    when = DateTime(timezone=True)
    return text(
        f"INSERT INTO usage_counters ({columns}) VALUES {rows} "
        "ON CONFLICT (tenant_id, user_id, period, starts_at) DO UPDATE SET "
        "tokens = usage_counters.tokens + excluded.tokens, "
        "model_calls = usage_counters.model_calls + excluded.model_calls, "
        "tool_calls = usage_counters.tool_calls + excluded.tool_calls, "
        f"max_call_tokens = {greatest}(usage_counters.max_call_tokens, excluded.max_call_tokens), "
        "updated_at = excluded.updated_at"
    ).bindparams(*(bindparam(name, type_=when) for name in ("p_day", "p_month", "p_now")))


def usage_report(db: Session, settings: Settings, who: Principal, now: datetime | None = None) -> dict[str, Any]:
    """What ``who`` and their tenant spent this day and month, against the limits (``db``: the system scope)."""
    now = now or utcnow()
    limits = {(scope, period): limit for scope, period, limit in token_limits(settings)}
    out: dict[str, Any] = {}
    for scope in ("user", "tenant"):
        periods = {}
        for period in PERIODS:
            start = period_start(period, now)
            clauses = [UsageCounter.tenant_id == who.tenant_id, UsageCounter.period == period,
                       UsageCounter.starts_at == start]
            if scope == "user":
                clauses.append(UsageCounter.user_id == who.user_id)
            row = db.execute(select(func.coalesce(func.sum(UsageCounter.tokens), 0),
                                    func.coalesce(func.sum(UsageCounter.model_calls), 0),
                                    func.coalesce(func.sum(UsageCounter.tool_calls), 0)).where(*clauses)).one()
            limit = limits.get((scope, period))
            periods[period] = {
                "tokens": int(row[0]), "model_calls": int(row[1]), "tool_calls": int(row[2]),
                "token_limit": limit, "remaining_tokens": max(0, limit - int(row[0])) if limit else None,
                "starts_at": iso(start), "resets_at": iso(period_end(period, start)),
            }
        out[scope] = periods
    out["per_turn"] = {"model_calls": settings.budget_model_calls_per_turn or None,
                       "tool_calls": settings.budget_tool_calls_per_turn or None}
    return out


class UsageCollector:
    """Gauges of the current day's and month's spending per tenant, computed from Postgres on each scrape."""

    def __init__(self, sessions: Any, settings: Settings):
        self.sessions, self.settings = sessions, settings

    def describe(self) -> list[Any]:
        return []  # computed on scrape

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        from shared.auth.principal import SYSTEM
        from shared.db import set_scope

        now = utcnow()
        try:
            with self.sessions() as db:
                set_scope(db, SYSTEM)  # totals per tenant: the narrow system path
                rows = []
                for period in PERIODS:
                    query = (select(UsageCounter.tenant_id, func.sum(UsageCounter.tokens),
                                    func.sum(UsageCounter.model_calls), func.sum(UsageCounter.tool_calls))
                             .where(UsageCounter.period == period,
                                    UsageCounter.starts_at == period_start(period, now))
                             .group_by(UsageCounter.tenant_id))
                    rows += [(period, *row) for row in db.execute(query)]
                db.rollback()
        except Exception:  # noqa: BLE001 - a scrape must not fail because Postgres is slow or down
            return
        families = {name: GaugeMetricFamily(f"steprun_usage_{name}", f"{title} this UTC day/month, per tenant.",
                                            labels=["tenant", "period"])
                    for name, title in (("tokens", "Model tokens spent"), ("model_calls", "Model calls made"),
                                        ("tool_calls", "Tool executions"))}
        for period, tenant, tokens, calls, tools in rows:
            families["tokens"].add_metric([tenant, period], float(tokens or 0))
            families["model_calls"].add_metric([tenant, period], float(calls or 0))
            families["tool_calls"].add_metric([tenant, period], float(tools or 0))
        limits = GaugeMetricFamily("steprun_budget_token_limit", "Token budgets set (0: none).",
                                   labels=["scope", "period"])
        for scope, period, limit in token_limits(self.settings):
            limits.add_metric([scope, period], float(limit))
        yield from families.values()
        yield limits


_usage_collector: UsageCollector | None = None


def register_usage_metrics(sessions: Any, settings: Settings) -> None:
    """Expose the usage gauges on this process's /metrics, once per process (a second app re-points it)."""
    global _usage_collector
    from shared.metrics import register_on_scrape

    with _COLLECTOR_LOCK:
        if _usage_collector is None:
            _usage_collector = UsageCollector(sessions, settings)
            register_on_scrape(_usage_collector)
        _usage_collector.sessions, _usage_collector.settings = sessions, settings
