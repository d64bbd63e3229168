"""Optional export of trace spans to an OpenTelemetry collector (OTLP over HTTP).

On when ``STEPRUN_OTEL_ENDPOINT`` is set *and* the ``otel`` extra is installed
(``pip install 'steprun[otel]'``: opentelemetry-sdk and the OTLP/HTTP exporter);
steprun does not depend on them otherwise. Spans are exported after the step's
commit by a batching processor in a background thread, never on the step's
path. The resource is ``service.name=steprun`` unless ``OTEL_SERVICE_NAME`` /
``OTEL_RESOURCE_ATTRIBUTES`` (read by the SDK itself) say otherwise.

Every step of a turn, whichever process ran it, joins one trace: the trace id
is derived from the turn id, with a remote parent standing for the turn. The
exported span ids are the SDK's own (it cannot take ours); the stored ones
stay what /v1/turns/{id}/trace shows.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

from shared.models import TraceSpan
from shared.settings import Settings

log = logging.getLogger(__name__)


def trace_id_for(turn_id: str) -> str:
    """The turn's trace id (32 hex digits), the same in every process that runs one of its steps."""
    return hashlib.sha256(turn_id.encode()).hexdigest()[:32]

# One tracer provider per process and endpoint: process-wide configuration, like a logging handler.
_lock = threading.Lock()
_providers: dict[str, Any] = {}


def _provider(settings: Settings) -> Any:
    endpoint = settings.otel_endpoint or ""
    with _lock:
        if endpoint not in _providers:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
                from opentelemetry.sdk.resources import Resource
                from opentelemetry.sdk.trace import TracerProvider
                from opentelemetry.sdk.trace.export import BatchSpanProcessor
            except ImportError:
                log.warning("STEPRUN_OTEL_ENDPOINT is set but the otel extra is not installed: "
                            "traces stay in the database only (pip install 'steprun[otel]')")
                _providers[endpoint] = None
            else:
                provider = TracerProvider(resource=Resource.create({"service.name": "steprun"}))
                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
                _providers[endpoint] = provider
        return _providers[endpoint]


def _ns(value: datetime) -> int:
    aware = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return int(aware.timestamp() * 1_000_000_000)


def _attributes(row: TraceSpan) -> dict[str, Any]:
    """OTel attributes are primitives: nested values travel as JSON text, missing ones are left out."""
    out: dict[str, Any] = {"steprun.turn_id": row.turn_id, "steprun.session_id": row.session_id,
                           "steprun.step": row.step, "steprun.attempt": row.attempt, "steprun.kind": row.kind}
    for key, value in (row.attributes or {}).items():
        if value is None:
            continue
        out[f"steprun.{key}"] = value if isinstance(value, (str, bool, int, float)) else json.dumps(value)
    return out


def export_spans(settings: Settings, rows: list[TraceSpan]) -> None:
    """Send one committed step's spans (the step span first, then its children)."""
    provider = _provider(settings)
    if provider is None or not rows:
        return
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags


    tracer = provider.get_tracer("steprun")
    trace_hex = trace_id_for(rows[0].turn_id)
    turn = SpanContext(trace_id=int(trace_hex, 16), span_id=int(trace_hex[:16], 16), is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED))

    def emit(row: TraceSpan, parent: Any) -> Any:
        span = tracer.start_span(row.name, context=parent, start_time=_ns(row.started_at),
                                 attributes=_attributes(row))
        if row.status != "ok":
            span.set_status(Status(StatusCode.ERROR, row.status))
        return span

    step_row, children = rows[0], rows[1:]
    step = emit(step_row, trace.set_span_in_context(NonRecordingSpan(turn)))
    inside = trace.set_span_in_context(step)
    for row in children:
        emit(row, inside).end(end_time=_ns(row.started_at + timedelta(milliseconds=row.duration_ms)))
    step.end(end_time=_ns(step_row.started_at + timedelta(milliseconds=step_row.duration_ms)))


def flush(settings: Settings, timeout_seconds: float = 5.0) -> bool:
    """Export what is batched now (shutdown hooks, tests)."""
    provider = _provider(settings)
    return bool(provider and provider.force_flush(int(timeout_seconds * 1000)))
