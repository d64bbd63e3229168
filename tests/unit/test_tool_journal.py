"""The tool-call journal and the recorded model response, called directly: a step that dies at the worst
moments is retried without running a side effect twice, and says what it did.

A worker's death is a BaseException raised at the moment under test (nothing in the step
may catch it, as nothing survives a SIGKILL); the lease is then expired by hand, as the
scheduler would find it, and the step is run again. tests/e2e/test_tool_chaos.py does
the same with real processes and SIGKILL.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from shared.agent import AgentRegistry
from shared.auth.principal import SYSTEM, Principal
from shared.clock import utcnow
from shared.db import unit_of_work
from shared.engine import step as step_module
from shared.engine import tools as tools_module
from shared.engine.step import build_runtime, run_step
from shared.errors import BadInput
from shared.models import Message, ModelCall, ToolCall, TraceSpan, Turn, UsageCounter
from shared.runtime import Runtime
from shared.settings import Settings
from shared.turns import service as turns
from tests.support import agents_journal
from tests.support.agents_journal import EFFECTS, INVENTIVE
from tests.support.turns import start_turn


class WorkerDied(BaseException):
    """Stands for SIGKILL: no handler in the step catches it."""


@pytest.fixture(scope="module")
def agents() -> AgentRegistry:
    return AgentRegistry.from_module("tests.support.agents_journal")


@pytest.fixture(scope="module")
def jrt(settings: Settings, agents: AgentRegistry) -> Iterator[Runtime]:
    runtime = build_runtime(settings, agents=agents)
    yield runtime
    runtime.close()


@pytest.fixture(autouse=True)
def _clean_effects() -> None:
    EFFECTS.clear()


def start(rt: Runtime, who: Principal, agent: str = "shop", text: str = "buy") -> tuple[str, str]:
    return start_turn(rt, who, agent, text)


def lapse_lease(rt: Runtime, turn_id: str) -> None:
    """What the scheduler finds after a SIGKILL: the dead attempt's lease has run out."""
    with unit_of_work(rt.sessions, SYSTEM) as db:
        db.execute(update(Turn).where(Turn.id == turn_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def turn_row(rt: Runtime, turn_id: str) -> Turn:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        row = db.get(Turn, turn_id)
        assert row is not None
        return row


def events(rt: Runtime, session_id: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in rt.events.read(session_id, 0, 5000).events]


def retried_journals(rt: Runtime, session_id: str) -> list[str]:
    """The journal field of each tool.result of the retried attempt (a killed one flushed what it had, or not)."""
    evs = events(rt, session_id)
    last = max(i for i, e in enumerate(evs) if e["type"] == "step.retrying")
    return [e["data"]["journal"] for e in evs[last:] if e["type"] == "tool.result"]


def effects(tool: str) -> list[dict[str, Any]]:
    return [e for e in EFFECTS if e["tool"] == tool]


def die_once(when: Callable[..., bool]) -> Callable[..., None]:
    """A maybe_die that kills the 'worker' the first time ``when(moment, turn, call, tool)`` holds."""
    fired: list[bool] = []

    def maybe_die(moment: str, turn_id: str, call_id: str, tool_name: str) -> None:
        if not fired and when(moment, turn_id, call_id, tool_name):
            fired.append(True)
            raise WorkerDied(moment)
    return maybe_die


def kill_after_effect_of(monkeypatch: pytest.MonkeyPatch, tool_name: str) -> None:
    monkeypatch.setattr(agents_journal, "maybe_die", die_once(lambda m, t, c, name: name == tool_name))


def run_dying(rt: Runtime, turn_id: str, step: int) -> None:
    with pytest.raises(WorkerDied):
        run_step(rt, turn_id, step)
    lapse_lease(rt, turn_id)


def test_a_non_idempotent_tool_killed_after_its_effect_is_asked_about_not_run_again(
        jrt: Runtime, who: Principal, monkeypatch: pytest.MonkeyPatch) -> None:
    kill_after_effect_of(monkeypatch, "charge")
    calls_before = INVENTIVE.calls
    sid, tid = start(jrt, who)
    run_dying(jrt, tid, 0)
    assert len(effects("charge")) == 1
    assert run_step(jrt, tid, 0) == "requires_action"
    # The retried attempt did not call the model again: it used the recorded response (same call ids).
    assert INVENTIVE.calls == calls_before + 1
    turn = turn_row(jrt, tid)
    pending = turn.pending or {}
    charged = effects("charge")[0]
    assert pending["reason"] == "tool_outcome_unknown"
    assert [u["id"] for u in pending["unknown"]] == [charged["call_id"]]
    assert [c["name"] for c in pending["tool_calls"]] == ["charge", "reserve"]  # the rest waits too
    assert len(effects("charge")) == 1 and effects("reserve") == []
    unknown = [e for e in events(jrt, sid) if e["type"] == "tool.outcome_unknown"]
    assert [(e["data"]["id"], e["data"]["policy"]) for e in unknown] == [(charged["call_id"], "pause")]
    paused = [e for e in events(jrt, sid) if e["type"] == "turn.requires_action"]
    assert paused[-1]["data"]["reason"] == "tool_outcome_unknown"

    with unit_of_work(jrt.sessions, who) as db, pytest.raises(BadInput, match="tool_outcome"):
        turns.resume_turn(db, jrt, who, tid, {})
    with unit_of_work(jrt.sessions, who) as db:
        turns.resume_turn(db, jrt, who, tid, {"tool_outcome": "skip"})
    assert run_step(jrt, tid, 1) == "in_progress"  # skip answers the call, reserve runs, round 2 is asked for
    assert run_step(jrt, tid, 2) == "completed"
    assert len(effects("charge")) == 2  # the skipped call, and round 2's: each executed once
    assert len({e["call_id"] for e in effects("charge")}) == 2
    results = {e["data"]["id"]: e["data"] for e in events(jrt, sid) if e["type"] == "tool.result"}
    assert results[charged["call_id"]]["journal"] == "skipped"
    with unit_of_work(jrt.sessions, SYSTEM) as db:
        spans = db.scalars(select(TraceSpan).where(TraceSpan.turn_id == tid, TraceSpan.kind == "tool")).all()
        journal = sorted((s.attributes["call_id"] == charged["call_id"], s.attributes["journal"], s.status)
                         for s in spans)
        assert (True, "unknown", "unknown") in journal and (True, "skipped", "ok") in journal
        model_spans = db.scalars(select(TraceSpan).where(TraceSpan.turn_id == tid, TraceSpan.kind == "model",
                                                         TraceSpan.step == 0)).all()
        assert [s.attributes.get("replayed") for s in model_spans] == [True]


def test_retry_runs_the_unknown_call_again_with_the_same_key(jrt: Runtime, who: Principal,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    kill_after_effect_of(monkeypatch, "charge")
    sid, tid = start(jrt, who)
    run_dying(jrt, tid, 0)
    assert run_step(jrt, tid, 0) == "requires_action"
    with unit_of_work(jrt.sessions, who) as db:
        turns.resume_turn(db, jrt, who, tid, {"tool_outcome": "retry"})
    assert run_step(jrt, tid, 1) == "in_progress"
    first, again = effects("charge")[:2]
    assert (first["call_id"], first["idempotency_key"]) == (again["call_id"], again["idempotency_key"])
    with unit_of_work(jrt.sessions, SYSTEM) as db:
        row = db.scalars(select(ToolCall).where(ToolCall.turn_id == tid, ToolCall.call_id == first["call_id"])).one()
        assert (row.status, row.runs) == ("succeeded", 2)
    results = {e["data"]["id"]: e["data"] for e in events(jrt, sid) if e["type"] == "tool.result"}
    assert results[first["call_id"]]["journal"] == "retried"


def test_a_retry_that_dies_too_is_asked_about_again(jrt: Runtime, who: Principal,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's "retry" answers for the attempt they were told about, not for the retry's own death."""
    deaths: list[str] = []

    def die_twice(moment: str, turn_id: str, call_id: str, tool_name: str) -> None:
        if tool_name == "charge" and len(deaths) < 2:
            deaths.append(call_id)
            raise WorkerDied(moment)
    monkeypatch.setattr(agents_journal, "maybe_die", die_twice)
    _, tid = start(jrt, who)
    run_dying(jrt, tid, 0)
    assert run_step(jrt, tid, 0) == "requires_action"
    with unit_of_work(jrt.sessions, who) as db:
        turns.resume_turn(db, jrt, who, tid, {"tool_outcome": "retry"})
    run_dying(jrt, tid, 1)  # the retried charge ran, and its worker died before recording it
    assert len(effects("charge")) == 2
    assert run_step(jrt, tid, 1) == "requires_action"  # asked again, not run a third time
    pending = turn_row(jrt, tid).pending or {}
    assert pending["reason"] == "tool_outcome_unknown" and pending["call_step"] == 0
    with unit_of_work(jrt.sessions, who) as db:
        turns.resume_turn(db, jrt, who, tid, {"tool_outcome": "skip"})
    assert run_step(jrt, tid, 2) == "in_progress"
    assert run_step(jrt, tid, 3) == "completed"
    assert len(effects("charge")) == 3  # two for the first call (the user chose to retry), one for round 2


def test_an_idempotent_tool_is_rerun_with_the_same_key(jrt: Runtime, who: Principal,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    kill_after_effect_of(monkeypatch, "reserve")
    sid, tid = start(jrt, who)
    run_dying(jrt, tid, 0)
    assert run_step(jrt, tid, 0) == "in_progress"  # no pause: the tool said it is safe to run again
    assert len(effects("charge")) == 1  # charge's result was recorded before the kill: reused
    first, again = effects("reserve")
    assert first["idempotency_key"] == again["idempotency_key"] and first["nonce"] == again["nonce"]
    data = {(e["type"], e["data"].get("id")): e["data"] for e in events(jrt, sid)}
    assert data[("tool.outcome_unknown", first["call_id"])]["policy"] == "rerun"
    assert retried_journals(jrt, sid) == ["reused", "rerun"]  # charge's recorded result, reserve run again


def test_a_result_recorded_before_the_kill_is_reused(jrt: Runtime, who: Principal,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    original = tools_module.record_tool_result
    fired: list[bool] = []

    def record_then_die(*args: Any) -> None:
        original(*args)
        if not fired and args[3] and len(EFFECTS) == 2:  # both tools' results recorded; the commit is next
            fired.append(True)
            raise WorkerDied("after record")
    monkeypatch.setattr(tools_module, "record_tool_result", record_then_die)
    sid, tid = start(jrt, who)
    run_dying(jrt, tid, 0)
    assert run_step(jrt, tid, 0) == "in_progress"
    assert len(effects("charge")) == 1 and len(effects("reserve")) == 1
    assert retried_journals(jrt, sid) == ["reused", "reused"]


def test_a_retried_step_reuses_the_recorded_model_response(jrt: Runtime, who: Principal,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer is recorded with its first tool call's start: an attempt dying right after that transaction
    (before the tool ran) leaves both; the retry replays the answer (the same calls, not a new model call), and
    the started call is one whose outcome nobody knows (the non-idempotent charge pauses the turn)."""
    original = tools_module.start_tool_call

    def start_then_die(*args: Any, response: Any = None) -> None:
        original(*args, response=response)
        if response is not None:
            raise WorkerDied("after the model's response was recorded with the first tool call's start")
    monkeypatch.setattr(tools_module, "start_tool_call", start_then_die)
    calls_before = INVENTIVE.calls
    sid, tid = start(jrt, who)
    run_dying(jrt, tid, 0)
    assert _model_calls(jrt, tid) == [(0, "recorded", 1, True)]
    monkeypatch.setattr(tools_module, "start_tool_call", original)
    assert run_step(jrt, tid, 0) == "requires_action"
    assert INVENTIVE.calls == calls_before + 1
    evs = events(jrt, sid)
    replayed = [e for e in evs if e["type"] == "model.replayed"]
    assert len(replayed) == 1 and replayed[0]["data"]["attempt"] == 2
    # The text is streamed again under the new attempt, so a client that drops the dead attempt's deltas has it.
    assert any(e["type"] == "message.delta" and e["data"]["attempt"] == 2 for e in evs)
    assert effects("charge") == []
    assert (turn_row(jrt, tid).pending or {}).get("reason") == "tool_outcome_unknown"


def test_an_answer_whose_first_tool_call_is_refused_is_recorded_by_the_commit(
        settings: Settings, agents: AgentRegistry, who: Principal, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused first call (its tool budget, checked in the start's transaction once the model answered) rolls
    back its start and the answer's record with it: the step's commit records the answer, counts its tokens once,
    and no tool runs."""
    from shared.turns import budgets

    check = budgets.check_tool_calls
    calls_before = INVENTIVE.calls

    def refuse_once_the_model_answered(db: Any, settings: Settings, turn_id: str) -> None:
        check(db, settings, turn_id)
        if INVENTIVE.calls > calls_before:
            raise budgets.BudgetExceeded("tool_calls_per_turn", 0, 1, None, "refused for the test")
    monkeypatch.setattr(budgets, "check_tool_calls", refuse_once_the_model_answered)
    rt = build_runtime(settings.replace(budget_tool_calls_per_turn=5), agents=agents)
    try:
        _, tid = start(rt, who)
        model_calls = _counted_model_calls(rt, who)
        assert run_step(rt, tid, 0) == "incomplete"
        assert INVENTIVE.calls == calls_before + 1
        assert _model_calls(rt, tid) == [(0, "recorded", 1, True)]
        assert _counted_model_calls(rt, who) == model_calls + 1
        assert effects("charge") == []
        with unit_of_work(rt.sessions, SYSTEM) as db:
            assert db.scalars(select(ToolCall.id).where(ToolCall.turn_id == tid)).all() == []
        assert (turn_row(rt, tid).error or {}).get("code") == "budget"
    finally:
        rt.close()


def test_an_answer_recorded_by_a_start_that_then_failed_is_not_counted_twice_by_the_commit(
        jrt: Runtime, who: Principal, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first tool call's start records the answer and lands, but its caller sees an error (a lost reply):
    the step fails its turn, and its commit, which records an answer no start is known to have recorded,
    finds this one there: recorded once, counted once."""
    original = tools_module.start_tool_call

    def start_then_fail(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        raise RuntimeError("the start's reply was lost")
    monkeypatch.setattr(tools_module, "start_tool_call", start_then_fail)
    _, tid = start(jrt, who)
    model_calls = _counted_model_calls(jrt, who)
    assert run_step(jrt, tid, 0) == "failed"
    assert _model_calls(jrt, tid) == [(0, "recorded", 1, True)]
    assert _counted_model_calls(jrt, who) == model_calls + 1
    assert effects("charge") == []


def test_the_fail_policy_fails_the_turn(settings: Settings, agents: AgentRegistry, who: Principal,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rt = build_runtime(settings.replace(tool_outcome_unknown="fail"), agents=agents)
    try:
        kill_after_effect_of(monkeypatch, "charge")
        sid, tid = start(rt, who)
        run_dying(rt, tid, 0)
        assert run_step(rt, tid, 0) == "failed"
        turn = turn_row(rt, tid)
        assert turn.error and turn.error["code"] == "tool_outcome_unknown"
        assert len(effects("charge")) == 1
        unknown = [e for e in events(rt, sid) if e["type"] == "tool.outcome_unknown"]
        assert unknown[0]["data"]["policy"] == "fail"
    finally:
        rt.close()


def test_a_zombie_attempt_cannot_record(jrt: Runtime, who: Principal) -> None:
    """The journal's writes are fenced: after another attempt claimed the turn, the old one writes nothing."""
    from shared.engine.claim import claim_turn
    from shared.engine.journal import finish_tool_call, start_tool_call
    from shared.engine.outcome import StepInterrupted

    _, tid = start(jrt, who)
    with unit_of_work(jrt.sessions, SYSTEM) as db:
        old = claim_turn(db, tid, 0, "w1", 30)
    assert old is not None
    start_tool_call(jrt, old, 0, {"id": "c1", "name": "charge"}, "k")
    lapse_lease(jrt, tid)
    with unit_of_work(jrt.sessions, SYSTEM) as db:
        assert claim_turn(db, tid, 0, "w2", 30) is not None
    with pytest.raises(StepInterrupted):
        finish_tool_call(jrt, old, 0, "c1", "charged", False)
    with unit_of_work(jrt.sessions, SYSTEM) as db:
        assert db.scalars(select(ToolCall.status).where(ToolCall.turn_id == tid)).one() == "started"


def test_the_fence_folded_into_each_journal_write_still_stops_a_zombie(jrt: Runtime, who: Principal) -> None:
    """Each write carries its fence: after another attempt claimed the turn, the old one's response record, tool
    start and tool finish all raise and write nothing, while the new attempt's own writes land (and a repeat of
    one, as after a dropped connection, changes nothing and is counted once)."""
    from shared.engine.claim import claim_turn
    from shared.engine.journal import finish_tool_call, start_model_call, start_tool_call
    from shared.engine.outcome import StepInterrupted
    from shared.llm import ModelResponse
    from shared.llm.base import ToolCallRequest, Usage

    response = ModelResponse(text="", tool_calls=[ToolCallRequest("c1", "charge", {})], usage=Usage(3, 4),
                             finish_reason="tool_calls")
    _, tid = start(jrt, who)
    with unit_of_work(jrt.sessions, SYSTEM) as db:
        old = claim_turn(db, tid, 0, "w1", 30)
    assert old is not None
    start_model_call(jrt, old, lambda: None)
    lapse_lease(jrt, tid)
    with unit_of_work(jrt.sessions, SYSTEM) as db:
        new = claim_turn(db, tid, 0, "w2", 30)
    assert new is not None
    for write in (lambda: start_tool_call(jrt, old, 0, {"id": "c1", "name": "charge"}, "k", response=response),
                  lambda: start_tool_call(jrt, old, 0, {"id": "c1", "name": "charge"}, "k"),
                  lambda: finish_tool_call(jrt, old, 0, "c1", "charged", False)):
        with pytest.raises(StepInterrupted):
            write()
    with unit_of_work(jrt.sessions, SYSTEM) as db:
        assert db.scalars(select(ModelCall.status).where(ModelCall.turn_id == tid)).one() == "started"
        assert db.scalars(select(ToolCall.id).where(ToolCall.turn_id == tid)).all() == []
    before = _counted_tool_calls(jrt, who)
    start_model_call(jrt, new, lambda: None)
    for _ in range(2):  # the second time: a repeat after a dropped connection
        start_tool_call(jrt, new, 0, {"id": "c1", "name": "charge"}, "k", response=response)
    finish_tool_call(jrt, new, 0, "c1", "charged", False)
    finish_tool_call(jrt, new, 0, "no-such-call", "x", False)  # no row: nothing to record, no error
    with unit_of_work(jrt.sessions, SYSTEM) as db:
        call = db.scalars(select(ModelCall).where(ModelCall.turn_id == tid)).one()
        assert (call.status, call.attempt, call.calls) == ("recorded", new.attempt, 2)
        row = db.scalars(select(ToolCall).where(ToolCall.turn_id == tid)).one()
        assert (row.status, row.attempt, row.runs, row.output) == ("succeeded", new.attempt, 1, "charged")
    assert _counted_tool_calls(jrt, who) == before + 1


def test_a_fenced_journal_write_holds_the_turn_row_until_it_commits(jrt: Runtime, who: Principal,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The fence inside the write takes the turn row's share lock, as a separate fence read did: a claim
    (which updates the row) would wait until the write's transaction ends."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from shared.engine.claim import claim_turn
    from shared.engine.journal import start_model_call, start_tool_call
    from shared.llm import ModelResponse
    from shared.llm.base import ToolCallRequest, Usage
    from shared.turns import budgets

    _, tid = start(jrt, who)
    with unit_of_work(jrt.sessions, SYSTEM) as db:
        claim = claim_turn(db, tid, 0, "w1", 30)
    assert claim is not None
    start_model_call(jrt, claim, lambda: None)
    locked: list[bool] = []
    count = budgets.count

    def count_and_probe(db: Any, *args: Any, **kwargs: Any) -> None:
        count(db, *args, **kwargs)
        with unit_of_work(jrt.sessions, SYSTEM) as other:  # another connection, while the write is uncommitted
            try:
                other.execute(text("SELECT id FROM turns WHERE id = :t FOR UPDATE NOWAIT"), {"t": tid})
                locked.append(False)
            except OperationalError:
                locked.append(True)
                other.rollback()
    monkeypatch.setattr(budgets, "count", count_and_probe)
    response = ModelResponse(text="", tool_calls=[ToolCallRequest("c1", "charge", {})], usage=Usage(1, 1),
                             finish_reason="tool_calls")
    start_tool_call(jrt, claim, 0, {"id": "c1", "name": "charge"}, "k", response=response)
    start_tool_call(jrt, claim, 0, {"id": "c2", "name": "charge"}, "k2")
    assert locked == [True, True, True]


def _counted_tool_calls(rt: Runtime, who: Principal) -> int:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        return int(db.scalar(select(func.max(UsageCounter.tool_calls))
                             .where(UsageCounter.tenant_id == who.tenant_id, UsageCounter.user_id == who.user_id))
                   or 0)


def _model_calls(rt: Runtime, turn_id: str) -> list[tuple[int, str, int, bool]]:
    """(step, status, calls, asked for tools) of each journaled model call of the turn."""
    with unit_of_work(rt.sessions, SYSTEM) as db:
        rows = db.scalars(select(ModelCall).where(ModelCall.turn_id == turn_id).order_by(ModelCall.step)).all()
        return [(r.step, r.status, r.calls, bool((r.response or {}).get("tool_calls"))) for r in rows]


def _counted_model_calls(rt: Runtime, who: Principal) -> int:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        return int(db.scalar(select(func.max(UsageCounter.model_calls))
                             .where(UsageCounter.tenant_id == who.tenant_id, UsageCounter.user_id == who.user_id))
                   or 0)


def test_every_model_call_is_journaled_the_last_by_the_steps_commit(jrt: Runtime, who: Principal) -> None:
    """The start rides on the claim and a tool-less answer on the commit: each call still recorded, counted once."""
    _, tid = start(jrt, who)
    step = 0
    while run_step(jrt, tid, step) == "in_progress":
        step += 1
    assert turn_row(jrt, tid).status == "completed"
    assert _model_calls(jrt, tid) == [(0, "recorded", 1, True), (1, "recorded", 1, True), (2, "recorded", 1, False)]
    assert _counted_model_calls(jrt, who) == 3


def test_a_worker_dying_before_the_commit_of_a_final_answer_calls_the_model_again(
        jrt: Runtime, who: Principal, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing ran after a tool-less answer, so its record waits for the commit: a kill before it leaves the
    call started (as a kill during the call does); the retry calls the model again and commits once."""
    original = step_module.commit_step

    def die_before_the_final_commit(rt: Runtime, claim: Any, result: Any, *args: Any) -> Any:
        if result.unrecorded_response is not None:
            raise WorkerDied("before the step's commit")
        return original(rt, claim, result, *args)
    _, tid = start(jrt, who)
    assert run_step(jrt, tid, 0) == "in_progress"
    assert run_step(jrt, tid, 1) == "in_progress"
    monkeypatch.setattr(step_module, "commit_step", die_before_the_final_commit)
    calls_before = INVENTIVE.calls
    run_dying(jrt, tid, 2)
    assert _model_calls(jrt, tid)[-1] == (2, "started", 1, False)
    monkeypatch.setattr(step_module, "commit_step", original)
    assert run_step(jrt, tid, 2) == "completed"
    assert INVENTIVE.calls == calls_before + 2
    assert _model_calls(jrt, tid)[-1] == (2, "recorded", 2, False)  # both calls counted against the per-turn cap
    with unit_of_work(jrt.sessions, SYSTEM) as db:
        assert db.scalar(select(func.count()).select_from(Message).where(
            Message.turn_id == tid, Message.step == 2)) == 1  # the answer, once
