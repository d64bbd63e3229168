"""The step's journal in Postgres: the model's response, and each tool call, written as they happen.

Two records make side effects happen once:

- the model's response (text, tool calls with their ids, usage) is recorded
  before any of its tools runs; a retried attempt of the step reuses it instead of
  calling the model again, so it sees the same tool calls with the same ids, and
  each tool gets the same idempotency key it got the first time;
- each tool call is journaled: a row committed before the tool runs, its result
  recorded as soon as it returns. A retried attempt reuses a recorded result; a row
  a dead attempt left ``started`` is a call whose outcome nobody knows
  (shared/engine/tools.py decides what to do with it).

Every write is fenced like the step's commit: it takes a share lock on the turn
row where ``attempt`` is this attempt's, as a condition of the write statement
itself (``EXISTS (… FOR SHARE)``; the separate fence read only when nothing was
written, to tell a lost lease from a row already there). A zombie attempt (its
lease lapsed, another claimed the turn) writes nothing and stops; a claim racing a
write waits for it, so the new attempt reads what the old one recorded. The
statements are built once (module level, or once per dialect for an ON CONFLICT)
and run as Core statements: no ORM objects, no per-call construction.

Budgets are checked in the same transaction that starts a model call
(shared/turns/budgets.py), and usage is counted in the one that records it.

None of the model's records has a transaction of its own in the usual case: a
step's first attempt starts its model call in the claim's transaction when no
token budget is set (:func:`start_model_call_with_claim`); a response that asks
for tools is recorded in the transaction that starts its first tool call
(:func:`start_tool_call`), which is the first thing that needs it recorded; and
a response no tool of this step runs after (no tool calls, a pause for the user,
a refused or interrupted first call) is recorded by the step's commit. An
attempt that dies before that transaction leaves the call ``started``, as one
dying during the call does, and its retry calls the model again: nothing ran on
the answer it lost.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, literal, select, type_coerce, update
from sqlalchemy.orm import Session

from shared.auth.principal import SYSTEM
from shared.clock import utcnow
from shared.db import database_unavailable, unit_of_work, write_later
from shared.engine.claim import Claim
from shared.engine.outcome import StepInterrupted, StopReason
from shared.llm import ModelResponse
from shared.llm.base import ToolCallRequest, Usage
from shared.models import ModelCall, ToolCall, Turn, table_of
from shared.runtime import Runtime
from shared.turns import budgets

log = logging.getLogger(__name__)

# How often a model call waiting near a token budget's end checks again.
BUDGET_POLL_SECONDS = 0.1
# Pauses between tries of a journal write while the database is unreachable (about half a minute in
# all, as for the step's commit): a restart must not cost the work the step did in memory.
RETRY_DELAYS = (0.25, 0.5, 1.0) + (2.0,) * 14


def ride_out_outages(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Retry ``fn`` while the database is unavailable; each journal write is safe to repeat."""
    @functools.wraps(fn)
    def retrying(*args: Any, **kwargs: Any) -> Any:
        for delay in RETRY_DELAYS:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                log.warning("database unavailable for %s, retrying in %ss: %s", fn.__name__, delay, exc)
                time.sleep(delay)
        return fn(*args, **kwargs)
    return retrying


@dataclass(frozen=True)
class JournalEntry:
    """A tool call as the journal has it."""

    step: int
    call_id: str
    name: str
    status: str  # started | succeeded | failed | skipped
    attempt: int
    runs: int
    output: str | None
    error: bool
    started_at: datetime


@dataclass
class StepJournal:
    """What earlier attempts of this step (and of the paused step it resumes) left recorded."""

    response: ModelResponse | None = None
    response_attempt: int | None = None
    calls: dict[tuple[int, str], JournalEntry] = field(default_factory=dict)
    # This attempt's model call was started (budgets checked) in the claim's transaction.
    model_call_started: bool = False
    # This attempt's answer from the model, not recorded yet: the first tool call's start records it.
    unrecorded_response: ModelResponse | None = None
    # A start that was to record it failed: it may have landed all the same (a lost reply).
    response_maybe_recorded: bool = False

    def entry(self, step: int, call_id: str) -> JournalEntry | None:
        return self.calls.get((step, call_id))


_turns, _model_calls, _tool_calls = (table_of(Turn), table_of(ModelCall),
                                      table_of(ToolCall))
# The journal's statements, built once (no per-call construction, cache key or ORM unit of work); those with
# an ON CONFLICT clause once per dialect (:func:`_per_dialect`).
_FENCE = (select(_turns.c.id).where(_turns.c.id == bindparam("b_turn_id"), _turns.c.attempt == bindparam("b_attempt"))
          .with_for_update(read=True))
_TOOL_ROW = (select(_tool_calls.c.id, _tool_calls.c.attempt, _tool_calls.c.status, _tool_calls.c.runs)
             .where(_tool_calls.c.turn_id == bindparam("b_turn_id"), _tool_calls.c.step == bindparam("b_step"),
                    _tool_calls.c.call_id == bindparam("b_call_id"))
             .with_for_update())
_TOOL_RERUN = (update(_tool_calls).where(_tool_calls.c.id == bindparam("b_row_id"))
               .values(attempt=bindparam("b_attempt"), status="started", runs=_tool_calls.c.runs + 1,
                       started_at=bindparam("b_now", type_=_tool_calls.c.started_at.type), output=None,
                       finished_at=None))
# The fence as a condition of the write itself (the same share lock, taken by the same statement).
_FENCE_HOLDS = _FENCE.exists()
_TOOL_FINISH = (update(_tool_calls)
                .where(_tool_calls.c.turn_id == bindparam("b_turn_id"), _tool_calls.c.step == bindparam("b_step"),
                       _tool_calls.c.call_id == bindparam("b_call_id"), _FENCE_HOLDS)
                .values(status=bindparam("b_status"), output=bindparam("b_output"), error=bindparam("b_error"),
                        finished_at=bindparam("b_now", type_=_tool_calls.c.finished_at.type),
                        attempt=bindparam("b_attempt"))
                .returning(_tool_calls.c.id))
_RECORD = (update(_model_calls)
           .where(_model_calls.c.turn_id == bindparam("b_turn_id"), _model_calls.c.step == bindparam("b_step"),
                  ~((_model_calls.c.status == "recorded") & (_model_calls.c.attempt == bindparam("b_attempt"))))
           .values(attempt=bindparam("b_attempt"), status="recorded",
                   response=bindparam("b_response", type_=_model_calls.c.response.type),
                   recorded_at=bindparam("b_now", type_=_model_calls.c.recorded_at.type))
           .returning(_model_calls.c.id))
_RECORD_FENCED = _RECORD.where(_FENCE_HOLDS)
_DIALECT_STATEMENTS: dict[tuple[str, str], Any] = {}


def _per_dialect(db: Session, name: str, build: Callable[[Any], Any]) -> Any:
    """The statement ``build(insert)`` makes with ``db``'s dialect's INSERT, built once per dialect."""
    dialect = db.get_bind().dialect.name
    stmt = _DIALECT_STATEMENTS.get((dialect, name))
    if stmt is None:
        stmt = _DIALECT_STATEMENTS[(dialect, name)] = build(budgets.dialect_insert(db))
    return stmt


def _build_start(insert: Any) -> Any:
    c = _model_calls.c
    stmt = insert(_model_calls).values(
        turn_id=bindparam("b_turn_id"), tenant_id=bindparam("b_tenant_id"), user_id=bindparam("b_user_id"),
        step=bindparam("b_step"), attempt=bindparam("b_attempt"), status="started", calls=1,
        started_at=bindparam("b_now", type_=c.started_at.type))
    # An earlier attempt called the model and died first; a repeat of this attempt's start changes nothing.
    return stmt.on_conflict_do_update(
        index_elements=[c.turn_id, c.step],
        set_={"attempt": stmt.excluded.attempt, "status": "started", "started_at": stmt.excluded.started_at,
              "calls": c.calls + 1},
        where=c.attempt != stmt.excluded.attempt)


def _build_record_upsert(insert: Any) -> Any:
    c = _model_calls.c
    stmt = insert(_model_calls).values(
        turn_id=bindparam("b_turn_id"), tenant_id=bindparam("b_tenant_id"), user_id=bindparam("b_user_id"),
        step=bindparam("b_step"), calls=1, attempt=bindparam("b_attempt"), status="recorded",
        response=bindparam("b_response", type_=c.response.type),
        recorded_at=bindparam("b_now", type_=c.recorded_at.type))
    # :data:`_RECORD`'s update where the row is there (its start's), an insert where not; this attempt's own
    # record already there (a repeat) changes nothing.
    return stmt.on_conflict_do_update(
        index_elements=[c.turn_id, c.step],
        set_={"attempt": stmt.excluded.attempt, "status": "recorded", "response": stmt.excluded.response,
              "recorded_at": stmt.excluded.recorded_at},
        where=~((c.status == "recorded") & (c.attempt == stmt.excluded.attempt)))


def _build_tool_insert(insert: Any) -> Any:
    c = _tool_calls.c
    values = {"turn_id": bindparam("b_turn_id"), "tenant_id": bindparam("b_tenant_id"),
              "user_id": bindparam("b_user_id"), "step": bindparam("b_step"), "call_id": bindparam("b_call_id"),
              "name": bindparam("b_name"), "idempotency_key": bindparam("b_key"), "attempt": bindparam("b_attempt"),
              "status": literal("started"), "runs": literal(1), "error": literal(False),
              "started_at": bindparam("b_now", type_=c.started_at.type)}
    # Only while the fence holds (its share lock taken by this statement); a row already there (an earlier
    # attempt's, or this one's before a dropped connection) inserts nothing.
    rows = select(*(type_coerce(v, c[k].type) for k, v in values.items())).where(_FENCE_HOLDS)
    return (insert(_tool_calls).from_select(list(values), rows)
            .on_conflict_do_nothing(index_elements=[c.turn_id, c.step, c.call_id]).returning(c.id))


def fenced(db: Session, claim: Claim) -> bool:
    """True if ``claim`` still holds the turn; holds a share lock on the turn row until the transaction ends."""
    return db.execute(_FENCE, {"b_turn_id": claim.turn_id, "b_attempt": claim.attempt}).first() is not None


def _lease_lost() -> StepInterrupted:
    return StepInterrupted(StopReason.LEASE_LOST)


@ride_out_outages
def load_journal(rt: Runtime, claim: Claim, steps: tuple[int, ...]) -> StepJournal:
    """The recorded response of this step and the journaled tool calls of ``steps``."""
    journal = StepJournal()
    if set(steps) == {claim.step} and claim.step_attempt == 1:
        # The first claim of this step (step_attempt counts them; only the commit that advances the
        # step resets it) and no paused step to resume: no attempt can have recorded anything yet.
        return journal
    with unit_of_work(rt.sessions, claim.principal) as db:
        row = db.scalars(select(ModelCall).where(ModelCall.turn_id == claim.turn_id, ModelCall.step == claim.step,
                                                 ModelCall.status == "recorded")).first()
        if row is not None and row.response is not None:
            journal.response, journal.response_attempt = response_from_record(row.response), row.attempt
        for call in db.scalars(select(ToolCall).where(ToolCall.turn_id == claim.turn_id, ToolCall.step.in_(steps))):
            journal.calls[(call.step, call.call_id)] = JournalEntry(
                call.step, call.call_id, call.name, call.status, call.attempt, call.runs, call.output, call.error,
                call.started_at)
    return journal


def response_record(response: ModelResponse) -> dict[str, Any]:
    return {"text": response.text,
            "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in response.tool_calls],
            "usage": {"input_tokens": response.usage.input_tokens, "output_tokens": response.usage.output_tokens},
            "finish_reason": response.finish_reason}


def response_from_record(record: dict[str, Any]) -> ModelResponse:
    usage = record.get("usage") or {}
    return ModelResponse(
        text=record.get("text") or "",
        tool_calls=[ToolCallRequest(c["id"], c["name"], c.get("arguments") or {}) for c in record.get("tool_calls")
                    or []],
        usage=Usage(int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)),
        finish_reason=record.get("finish_reason") or "stop",
    )


@contextmanager
def _budget_transaction(rt: Runtime, claim: Claim, scope: Any) -> Iterator[Session]:
    """A transaction that holds the tenant's budget lock when token budgets are set."""
    with unit_of_work(rt.sessions, scope) as db:
        if budgets.token_limits(rt.settings):
            budgets.lock_tenant(db, claim.principal.tenant_id)
        yield db


def _mark_started(db: Session, claim: Claim) -> None:
    """This attempt's model call of the step, in flight (a row an earlier attempt left is taken over): one
    statement."""
    write_later(db, _per_dialect(db, "start", _build_start),
                {"b_turn_id": claim.turn_id, "b_tenant_id": claim.principal.tenant_id,
                 "b_user_id": claim.principal.user_id, "b_step": claim.step, "b_attempt": claim.attempt,
                 "b_now": utcnow()})


def start_model_call_with_claim(db: Session, rt: Runtime, claim: Claim) -> bool:
    """Check the budgets and mark the step's model call in flight in the claim's own transaction (the
    system scope; the claim is its fence): True if done, so the step starts its call without a
    transaction of its own. False (nothing written) when a token budget is set, since its check takes the
    tenant's budget lock, which must come before any row lock (the claim has locked the turn row), or when
    a budget refuses: the step's own :func:`start_model_call` then checks again and says why.
    """
    if budgets.token_limits(rt.settings):
        return False
    try:
        budgets.check_before_model_call(db, rt.settings, claim.principal, claim.turn_id)
    except (budgets.BudgetExceeded, budgets.BudgetBusy):
        return False
    _mark_started(db, claim)
    return True


@ride_out_outages
def start_model_call(rt: Runtime, claim: Claim, check: Callable[[], None]) -> None:
    """Check the budgets and mark a model call of this step in flight; wait while the budget is busy.

    Raises :class:`~shared.turns.budgets.BudgetExceeded` when a budget is spent (or
    stayed busy for STEPRUN_BUDGET_WAIT_SECONDS), StepInterrupted if the lease is lost.
    ``check`` is called between waits (a cancel stops the wait).
    """
    deadline = time.monotonic() + rt.settings.budget_wait_seconds
    while True:
        try:
            # The system scope: a tenant's budget adds up every user's spending.
            with _budget_transaction(rt, claim, SYSTEM) as db:
                if not fenced(db, claim):
                    raise _lease_lost()
                budgets.check_before_model_call(db, rt.settings, claim.principal, claim.turn_id)
                _mark_started(db, claim)
            return
        except budgets.BudgetBusy as busy:
            if time.monotonic() >= deadline:
                raise budgets.BudgetExceeded(
                    "busy", 0, 0, None,
                    f"{busy}: waited STEPRUN_BUDGET_WAIT_SECONDS={rt.settings.budget_wait_seconds:g} s") from None
            check()
            time.sleep(BUDGET_POLL_SECONDS)


def _record_params(claim: Claim, response: ModelResponse) -> dict[str, Any]:
    return {"b_turn_id": claim.turn_id, "b_step": claim.step, "b_attempt": claim.attempt,
            "b_response": response_record(response), "b_now": utcnow()}


def _upsert_params(claim: Claim, response: ModelResponse) -> dict[str, Any]:
    return {**_record_params(claim, response), "b_tenant_id": claim.principal.tenant_id,
            "b_user_id": claim.principal.user_id}


def _count_answer(db: Session, claim: Claim, response: ModelResponse) -> None:
    budgets.count(db, claim.principal, tokens=response.usage.input_tokens + response.usage.output_tokens,
                  model_calls=1)


def record_response(db: Session, claim: Claim, response: ModelResponse) -> None:
    """Record the model's answer in ``db`` (fenced by the caller, holding the tenant's budget lock when token
    budgets are set) and count its tokens; a repeat of this attempt's record is a no-op (one upsert, which
    returns nothing then). The row lock is the upsert's own."""
    upsert = _per_dialect(db, "record_returning", lambda ins: _build_record_upsert(ins).returning(_model_calls.c.id))
    if db.execute(upsert, _upsert_params(claim, response)).first() is not None:
        _count_answer(db, claim, response)


def record_response_with_commit(db: Session, claim: Claim, response: ModelResponse) -> None:
    """:func:`record_response` in the step's commit, whose fenced update of the turn came first: the upsert
    and the tokens' count, both held (sent with the commit's next statement), no result read.

    No repeat to tell apart here: a commit that landed fences out its own retry (its update of the turn
    matches nothing), so this attempt's answer is recorded and counted once."""
    write_later(db, _per_dialect(db, "record", _build_record_upsert), _upsert_params(claim, response))
    _count_answer(db, claim, response)


def _record_fenced(db: Session, claim: Claim, response: ModelResponse) -> None:
    """Record the model's answer before its tools run, and count its tokens. StepInterrupted if fenced out."""
    # The usual case in one statement, fenced (the row its start wrote); else as the step's commit does it.
    if db.execute(_RECORD_FENCED, _record_params(claim, response)).first() is None:
        if not fenced(db, claim):
            raise _lease_lost()
        record_response(db, claim, response)
        return
    _count_answer(db, claim, response)


@ride_out_outages
def start_tool_call(rt: Runtime, claim: Claim, step: int, call: dict[str, Any], key: str, *,
                    response: ModelResponse | None = None) -> None:
    """Journal a tool call as started, committed before the tool runs (counted against the tool budget).

    ``response``: the model's answer that asked for the call, not recorded yet (the first call of a new
    answer). It is recorded first, in the same transaction: nothing runs between the answer and its first
    tool's start, so the two need no transaction each. If the start is refused (a tool budget, a lost
    lease), neither lands; the step's commit records the answer then.
    """
    with (_budget_transaction(rt, claim, claim.principal) if response is not None
          else unit_of_work(rt.sessions, claim.principal)) as db:
        if response is not None:
            _record_fenced(db, claim, response)
        if rt.settings.budget_tool_calls_per_turn > 0:
            if not fenced(db, claim):
                raise _lease_lost()  # before the budget says anything
            budgets.check_tool_calls(db, rt.settings, claim.turn_id)
        now = utcnow()
        this_call = {"b_turn_id": claim.turn_id, "b_step": step, "b_call_id": call["id"], "b_attempt": claim.attempt}
        # The usual case in one statement: the row inserted, fenced.
        inserted = db.execute(_per_dialect(db, "tool_insert", _build_tool_insert), {
            **this_call, "b_tenant_id": claim.principal.tenant_id, "b_user_id": claim.principal.user_id,
            "b_name": str(call["name"])[:200], "b_key": key, "b_now": now}).first()
        if inserted is None:
            if not fenced(db, claim):
                raise _lease_lost()
            # Journaled before: by an earlier attempt, or by this one before a dropped connection.
            row = db.execute(_TOOL_ROW, this_call).one()
            if row.attempt == claim.attempt and row.status == "started":
                return  # a repeat after a dropped connection: the start landed
            # Run again: an idempotent tool, or a retry the user chose; the key stays the first one.
            db.execute(_TOOL_RERUN, {"b_row_id": row.id, "b_attempt": claim.attempt, "b_now": now})
        budgets.count(db, claim.principal, tool_calls=1)


@ride_out_outages
def finish_tool_call(rt: Runtime, claim: Claim, step: int, call_id: str, output: str, error: bool,
                     status: str | None = None) -> None:
    """Record a tool call's result as soon as it is known (``status``: succeeded/failed, or skipped)."""
    with unit_of_work(rt.sessions, claim.principal) as db:
        # One statement, fenced; the row lock is the update's own.
        done = db.execute(_TOOL_FINISH, {"b_turn_id": claim.turn_id, "b_step": step, "b_call_id": call_id,
                                         "b_status": status or ("failed" if error else "succeeded"),
                                         "b_output": output, "b_error": error, "b_now": utcnow(),
                                         "b_attempt": claim.attempt}).first()
        if done is None and not fenced(db, claim):
            raise _lease_lost()  # else no row: nothing to record
