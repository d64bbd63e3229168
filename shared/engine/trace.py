"""Traces: a span for each step, model call and tool call of a turn.

A :class:`StepTrace` rides along one step attempt and only records timings in
memory (monotonic clock, anchored to wall time once). Its spans are added to
the step's fenced commit, so a zombie attempt writes no spans, and a turn's
trace costs no database round trip of its own: never one per token, nor per
tool. Metrics are observed, and spans optionally exported to OpenTelemetry,
after that commit.
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from shared import metrics
from shared.clock import aware, utcnow
from shared.db import after_commit, write_later
from shared.engine.claim import Claim
from shared.engine.otel import export_spans
from shared.engine.outcome import StepResult
from shared.logs import bind_log_context
from shared.models import TraceSpan, TurnStatus, table_of
from shared.runtime import Runtime

if TYPE_CHECKING:
    from shared.llm import ModelResponse

log = logging.getLogger(__name__)
MAX_ARGUMENT_CHARS = 4000  # a trace shows what a tool was asked; the full arguments are in the messages


def _span_id() -> str:
    return secrets.token_hex(8)


class StepTrace:
    """Spans of one step attempt, held in memory until the step commits."""

    def __init__(self, rt: Runtime, claim: Claim):
        self.rt, self.claim = rt, claim
        self._mono0 = time.monotonic()
        self._wall0 = utcnow()
        self.span_id = _span_id()
        self.children: list[dict[str, Any]] = []
        self._model: dict[str, Any] | None = None
        # Contextvars are per greenlet/thread: bound here, inside the step, they reach its log lines.
        bind_log_context(turn_id=claim.turn_id, session_id=claim.session_id, step=claim.step)
        if 1 < claim.step_attempt <= rt.settings.max_attempts:
            metrics.STEP_RETRIES.inc()

    def _since(self, mono: float) -> float:
        return round((mono - self._mono0) * 1000, 3)

    def model_started(self, model: Any) -> None:
        self._model = {"name": getattr(model, "name", "model"), "start": time.monotonic()}

    def model_finished(self, response: ModelResponse) -> None:
        if self._model is None:
            return
        model, self._model = self._model, None
        ttft = response.time_to_first_token
        self._add_child("model", model["name"], model["start"], time.monotonic(), "ok", {
            "input_tokens": response.usage.input_tokens,
            "output_tokens": response.usage.output_tokens,
            "finish_reason": response.finish_reason,
            "time_to_first_token_ms": round(ttft * 1000, 3) if ttft is not None else None,
            "tool_calls": len(response.tool_calls),
        })

    def model_replayed(self, response: ModelResponse, recorded_attempt: int | None) -> None:
        """The step reused the response an earlier attempt recorded: no model call was made."""
        now = time.monotonic()
        self._add_child("model", "recorded response", now, now, "ok", {
            "replayed": True, "recorded_attempt": recorded_attempt,
            "input_tokens": response.usage.input_tokens, "output_tokens": response.usage.output_tokens,
            "finish_reason": response.finish_reason, "tool_calls": len(response.tool_calls),
        })

    def tool_finished(self, call: dict[str, Any], output: str, error: Any, started: float, *,
                      journal: str = "ran", status: str | None = None) -> None:
        """A tool call ended; ``started`` is its time.monotonic() start; ``journal`` what the journal made of it."""
        arguments = json.dumps(call.get("arguments"), default=str)
        self._add_child("tool", call["name"], started, time.monotonic(), status or ("error" if error else "ok"), {
            "call_id": call["id"],
            "journal": journal,
            "arguments": call.get("arguments") if len(arguments) <= MAX_ARGUMENT_CHARS
            else arguments[:MAX_ARGUMENT_CHARS] + "…",
            "result_chars": len(output),
            "error": output[:500] if error else None,
        })

    def _add_child(self, kind: str, name: str, start: float, end: float, status: str,
                   attributes: dict[str, Any]) -> None:
        self.children.append({"kind": kind, "name": name, "start_ms": self._since(start),
                              "duration_ms": round(max(0.0, end - start) * 1000, 3),
                              "status": status, "attributes": attributes})

    def write(self, db: Session, enqueued_at: datetime | None, result: StepResult) -> None:
        """Add the step's spans to the step's commit (one INSERT); observe metrics once it commits.

        ``enqueued_at``: when the step was sent, for its queue latency."""
        end = time.monotonic()
        if self._model is not None:  # the call was interrupted (cancelled) or raised
            status = "cancelled" if result.status == TurnStatus.CANCELLED else "error"
            self._add_child("model", self._model["name"], self._model["start"], end, status,
                            {"error": (result.error or {}).get("message")})
            self._model = None
        step_ms = round((end - self._mono0) * 1000, 3)
        queued_ms = None
        if enqueued_at is not None:
            queued_ms = max(0.0, round((self._wall0 - aware(enqueued_at)).total_seconds() * 1000, 3))
        failed = result.status == TurnStatus.FAILED
        claim = self.claim
        common = {"tenant_id": claim.principal.tenant_id, "user_id": claim.principal.user_id,
                  "session_id": claim.session_id, "turn_id": claim.turn_id, "step": claim.step,
                  "attempt": claim.step_attempt}
        rows = [{**common, "span_id": self.span_id, "parent_span_id": None, "kind": "step",
                 "name": f"step {claim.step}", "status": "error" if failed else "ok", "started_at": self._wall0,
                 "duration_ms": step_ms, "attributes": {"outcome": result.status, "queue_latency_ms": queued_ms,
                                                        "usage": result.usage or None, "error": result.error}}]
        for child in self.children:
            rows.append({**common, "span_id": _span_id(), "parent_span_id": self.span_id, "kind": child["kind"],
                         "name": child["name"][:200], "status": child["status"],
                         "started_at": self._wall0 + timedelta(milliseconds=child["start_ms"]),
                         "duration_ms": child["duration_ms"], "attributes": child["attributes"]})
        # Core INSERTs, no ORM unit of work, sent with the commit's next statement: nothing reads them back.
        write_later(db, _INSERT_SPANS, rows)
        after_commit(db, lambda: self._committed(rows, result.status, step_ms, queued_ms))

    def _committed(self, rows: list[dict[str, Any]], outcome: str, step_ms: float, queued_ms: float | None) -> None:
        metrics.STEP_DURATION.labels(outcome=outcome).observe(step_ms / 1000)
        if queued_ms is not None:
            metrics.QUEUE_LATENCY.observe(queued_ms / 1000)
        registered = {t.name for agent in self.rt.agents for t in agent.tools}
        for row in rows:
            if row["kind"] == "model" and not row["attributes"].get("replayed"):
                metrics.MODEL_LATENCY.labels(model=row["name"]).observe(row["duration_ms"] / 1000)
                ttft = row["attributes"].get("time_to_first_token_ms")
                if ttft is not None:
                    metrics.TIME_TO_FIRST_TOKEN.labels(model=row["name"]).observe(ttft / 1000)
                for direction in ("input", "output"):
                    metrics.MODEL_TOKENS.labels(model=row["name"], direction=direction).inc(
                        row["attributes"].get(f"{direction}_tokens") or 0)
            elif row["kind"] == "tool":
                tool = metrics.tool_label(row["name"], registered)
                metrics.TOOL_DURATION.labels(tool=tool, outcome=row["status"]).observe(row["duration_ms"] / 1000)
        if self.rt.settings.otel_endpoint:
            export_spans(self.rt.settings, [TraceSpan(**row) for row in rows])


# Built once: its compiled form and cache key are reused by every step.
_INSERT_SPANS = insert(table_of(TraceSpan))
