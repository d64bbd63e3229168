"""Budgets are checked before each model call: a budget crossed mid-turn stops the next call, not the one after.

The ``spender`` agent's model costs exactly 10 tokens a call and always asks for
one more tool call, so only a budget ends its turns.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from shared.agent import AgentRegistry
from shared.auth.principal import SYSTEM, Principal
from shared.db import unit_of_work
from shared.engine.step import build_runtime, run_step
from shared.errors import BudgetExhausted
from shared.models import Turn
from shared.runtime import Runtime
from shared.settings import Settings
from shared.turns import budgets
from shared.turns import service as turns
from tests.support.agents_journal import SPENDER


@pytest.fixture(scope="module")
def agents() -> AgentRegistry:
    return AgentRegistry.from_module("tests.support.agents_journal")


@pytest.fixture
def runtime_with(settings: Settings, agents: AgentRegistry) -> Iterator[Any]:
    made: list[Runtime] = []

    def make(**budget: Any) -> Runtime:
        made.append(build_runtime(settings.replace(**budget), agents=agents))
        return made[-1]
    yield make
    for rt in made:
        rt.close()


def start(rt: Runtime, who: Principal, agent: str = "spender") -> str:
    with unit_of_work(rt.sessions, who) as db:
        session = turns.create_session(db, rt, who, agent, None)
        turn, _ = turns.create_turn(db, rt, who, session.id, "spend")
        return turn.id


def run_turn(rt: Runtime, turn_id: str, limit: int = 50) -> Turn:
    """Run the turn's steps in order until it stops being in progress."""
    for step in range(limit):
        status = run_step(rt, turn_id, step)
        if status != "in_progress":
            break
    with unit_of_work(rt.sessions, SYSTEM) as db:
        turn = db.get(Turn, turn_id)
        assert turn is not None
        return turn


def usage(rt: Runtime, who: Principal) -> dict[str, Any]:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        return budgets.usage_report(db, rt.settings, who)


def test_a_token_budget_crossed_mid_turn_stops_the_next_model_call(runtime_with: Any, who: Principal) -> None:
    rt = runtime_with(budget_user_tokens_per_day=35)
    before = SPENDER.calls
    turn = run_turn(rt, start(rt, who))
    # Calls 1-3 spend 30 (< 35): call 4 may start and crosses the line (40); call 5 is not made.
    assert SPENDER.calls - before == 4
    assert turn.status == "incomplete"
    assert turn.error and turn.error["code"] == "budget" and turn.error["budget"] == "user_tokens_per_day"
    assert turn.error["used"] == 40 and turn.error["limit"] == 35 and turn.error["resets_at"].endswith("Z")
    day = usage(rt, who)["user"]["day"]
    assert (day["tokens"], day["model_calls"], day["tool_calls"], day["remaining_tokens"]) == (40, 4, 4, 0)
    # A new turn is refused up front, with the time the budget resets.
    with unit_of_work(rt.sessions, who) as db:
        session = turns.create_session(db, rt, who, "spender", None)
        with pytest.raises(BudgetExhausted, match="resets at") as refused:
            turns.create_turn(db, rt, who, session.id, "more")
    assert refused.value.status == 429 and 0 < (refused.value.retry_after or 0) <= 86400


def test_a_tenant_budget_adds_up_its_users(runtime_with: Any, who: Principal) -> None:
    rt = runtime_with(budget_tenant_tokens_per_month=25)
    colleague = Principal(who.tenant_id, who.user_id + "-2")
    first = run_turn(rt, start(rt, who))
    assert first.error and first.error["budget"] == "tenant_tokens_per_month" and first.error["used"] == 30
    with unit_of_work(rt.sessions, colleague) as db:
        session = turns.create_session(db, rt, colleague, "spender", None)
        with pytest.raises(BudgetExhausted):
            turns.create_turn(db, rt, colleague, session.id, "spend")
    report = usage(rt, colleague)
    assert report["user"]["month"]["tokens"] == 0 and report["tenant"]["month"]["tokens"] == 30
    other_tenant = Principal(who.tenant_id + "-other", who.user_id)
    assert usage(rt, other_tenant)["tenant"]["month"]["tokens"] == 0
    start(rt, other_tenant)  # another tenant is not held back


def test_model_and_tool_calls_per_turn(runtime_with: Any, who: Principal) -> None:
    rt = runtime_with(budget_model_calls_per_turn=3)
    before = SPENDER.calls
    turn = run_turn(rt, start(rt, who))
    assert SPENDER.calls - before == 3
    assert turn.error and turn.error["budget"] == "model_calls_per_turn" and turn.status == "incomplete"

    rt = runtime_with(budget_tool_calls_per_turn=2)
    before = SPENDER.calls
    turn = run_turn(rt, start(rt, who))
    # Two tool calls ran (one per step); the third step's check stops the model call that would ask for more.
    assert SPENDER.calls - before == 2
    assert turn.error and turn.error["budget"] == "tool_calls_per_turn"
    # Budgets are per turn: the next turn starts afresh.
    assert run_turn(rt, start(rt, who)).error["used"] == 2  # type: ignore[index]
