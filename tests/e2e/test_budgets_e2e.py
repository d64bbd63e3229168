"""Budgets across processes: two workers spending one user's budget at once overshoot it by at most one call.

The ``slow_spender`` agent's model takes 0.3 s and costs exactly 10 tokens a call,
and always asks for another tool call: only the budget ends its turns. Eight turns
of one user run at once on two worker processes against a budget of 100 tokens.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from shared.settings import Settings
from tests.support.processes import Procs
from tests.support.recovery_support import Deployment, deploy, drop_database, fresh_database, own_settings

BUDGET, COST = 100, 10


@pytest.fixture
def spenders(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    url = fresh_database()
    own = own_settings(settings, url)
    procs = Procs(own, tmp_path_factory.mktemp("budgets"))
    try:
        d = deploy(procs, own, worker=False, STEPRUN_AGENTS="tests.support.agents_journal",
                   STEPRUN_RATE_LIMIT_PER_MINUTE="0", STEPRUN_RATE_LIMIT_PER_KEY="0",
                   STEPRUN_MAX_RUNNING_TURNS_PER_USER="0",  # all 8 turns spend at once
                   STEPRUN_BUDGET_USER_TOKENS_PER_DAY=str(BUDGET))
        d.worker()
        d.worker()
        yield d
    finally:
        procs.stop_all()
        drop_database(url)


def test_two_processes_spending_at_once_overshoot_by_at_most_one_call(spenders: Deployment) -> None:
    c = spenders.client()
    started = [c.start(c.session("slow_spender"), "spend")["id"] for _ in range(8)]
    done = [c.wait_turn(t, timeout=90) for t in started]
    assert all(t["status"] == "incomplete" and t["error"]["code"] == "budget" for t in done), done
    r = c.get("/v1/users/me/usage")
    assert r.status_code == 200, r.text
    day = r.json()["user"]["day"]
    calls = sum(t["usage"].get("steps", 0) for t in done)
    print(f"\nbudget {BUDGET} tokens, {COST} a call, 8 turns on 2 workers: spent {day['tokens']} in "
          f"{day['model_calls']} calls ({calls} steps committed)")
    assert BUDGET <= day["tokens"] <= BUDGET + COST  # at most one call past the line
    assert day["token_limit"] == BUDGET and day["remaining_tokens"] == 0
    # Both processes did some of the spending (Celery logs each task it receives).
    assert all("steps.run" in p.log() for p in spenders.workers)

    refused = c.post(f"/v1/sessions/{c.session('slow_spender')}/turns", {"input": "more"})
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "budget_exceeded" and "resets at" in refused.json()["error"]["message"]
    assert 0 < int(refused.headers["Retry-After"]) <= 86400
    metrics = requests.get(f"{spenders.url}/metrics", timeout=10).text
    assert 'steprun_usage_tokens{period="day",tenant="' in metrics
    assert 'steprun_budget_token_limit{period="day",scope="user"} 100.0' in metrics
