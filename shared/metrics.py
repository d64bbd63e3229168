"""Prometheus metrics of every process, and how each process exposes them.

The metric objects live in prometheus_client's default registry (process-wide
counters, not per-user state). Exposition:

- web: ``GET /metrics`` on the API. With several gunicorn workers set
  ``PROMETHEUS_MULTIPROC_DIR`` (an empty folder per host, wiped at start):
  every worker then writes its samples there and /metrics sums them;
  api/gunicorn_conf.py marks dead workers.
- worker: ``STEPRUN_WORKER_METRICS_PORT`` starts prometheus_client's own HTTP
  server when the Celery worker boots. Under the gevent pool (the Procfile's)
  tasks run in that very process, so the default registry is right. Under a
  prefork pool the tasks run in children: set ``PROMETHEUS_MULTIPROC_DIR`` too
  and the server sums the children's files.
- scheduler: ``STEPRUN_SCHEDULER_METRICS_PORT`` likewise (lease expiries).
- embedded (`steprun dev`): one process, so the API's /metrics has it all.

The gauge of open streams uses ``livesum`` so a dead process's streams vanish.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from shared.settings import Settings

log = logging.getLogger(__name__)

# Seconds: from a fast tool call to a long model answer.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# --- API --------------------------------------------------------------------
HTTP_REQUESTS = Counter("steprun_http_requests_total", "HTTP requests answered, by route template and status.",
                        ["method", "route", "status"])
HTTP_LATENCY = Histogram("steprun_http_request_duration_seconds",
                         "Time to the response's headers (a stream's body is not counted), by route.",
                         ["method", "route"], buckets=LATENCY_BUCKETS)
ACTIVE_STREAMS = Gauge("steprun_active_streams", "Open SSE and WebSocket streams.", ["transport"],
                       multiprocess_mode="livesum")

# --- steps (workers; the API too for turns it ends itself, e.g. a cancel) -----
TURNS_FINISHED = Counter("steprun_turns_finished_total", "Turns that reached a terminal status.", ["status"])
STEP_DURATION = Histogram("steprun_step_duration_seconds", "One committed step: claim to commit.",
                          ["outcome"], buckets=LATENCY_BUCKETS)
MODEL_LATENCY = Histogram("steprun_model_call_duration_seconds", "One model call, request to last token.",
                          ["model"], buckets=LATENCY_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram("steprun_model_time_to_first_token_seconds",
                                "Request to first streamed token (calls that streamed text).",
                                ["model"], buckets=LATENCY_BUCKETS)
MODEL_TOKENS = Counter("steprun_model_tokens_total", "Tokens in and out of models.", ["model", "direction"])
TOOL_DURATION = Histogram("steprun_tool_call_duration_seconds",
                          "One tool call, by tool (a name no served agent registers: \"unregistered\") and outcome.",
                          ["tool", "outcome"], buckets=LATENCY_BUCKETS)
# The ``tool`` label of a call whose name the model made up: one series for all of them, however many names.
UNREGISTERED_TOOL = "unregistered"
QUEUE_LATENCY = Histogram("steprun_queue_latency_seconds", "A step's wait from enqueue to a worker's claim.",
                          buckets=LATENCY_BUCKETS)
STEP_RETRIES = Counter("steprun_step_retries_total",
                       "Steps run again because an earlier attempt died (each step.retrying event).")
TOOL_JOURNAL = Counter("steprun_tool_calls_total",
                       "Tool calls by what the journal made of them: ran, reused (an earlier attempt's result), "
                       "rerun (idempotent, outcome unknown), retried / skipped / answered (the user chose), "
                       "unknown_paused / unknown_failed.", ["outcome"])
MODEL_REPLAYS = Counter("steprun_model_responses_replayed_total",
                        "Retried steps that reused the model response an earlier attempt recorded.")
BUDGET_STOPS = Counter("steprun_budget_stops_total", "Turns ended incomplete by a budget, by budget.", ["budget"])
BUDGET_REJECTIONS = Counter("steprun_budget_rejections_total",
                            "Turns refused at creation (429) because a token budget was spent.")
TURNS_DEFERRED = Counter("steprun_turns_deferred_total",
                         "First claims deferred because the turn's user or tenant ran its cap of turns, by cap.",
                         ["cap"])
QUOTA_REFUSALS = Counter("steprun_quota_refusals_total", "Writes refused (413) by a storage quota, by quota.",
                         ["quota"])
LEASE_EXPIRIES = Counter("steprun_lease_expiries_total",
                         "Running steps whose lease expired (worker presumed dead), found by the scheduler.")


def tool_label(name: str, registered: Collection[str]) -> str:
    """The ``tool`` label of a call: its name if an agent registers it, else ``"unregistered"``.

    Tool names come from the model; labelled as they are, every invented name would be a new series.
    """
    return name if name in registered else UNREGISTERED_TOOL


def stream_opened(transport: str) -> None:
    """Call when an SSE or WebSocket stream starts (``transport``: "sse" or "ws")."""
    ACTIVE_STREAMS.labels(transport=transport).inc()


def stream_closed(transport: str) -> None:
    """Call when that stream ends, whatever the reason."""
    ACTIVE_STREAMS.labels(transport=transport).dec()


@contextmanager
def track_stream(transport: str) -> Iterator[None]:
    """``with track_stream("sse"): ...`` counts one open stream for the block's lifetime."""
    stream_opened(transport)
    try:
        yield
    finally:
        stream_closed(transport)


# Collectors that compute their samples when scraped (shared/stats.py: queue latency from Postgres).
# Registered in REGISTRY by register_on_scrape; added to the multiprocess registry too, unsummed.
ON_SCRAPE: list[Any] = []


def register_on_scrape(collector: Any) -> None:
    """Expose ``collector`` on /metrics in both modes (once per process)."""
    if collector not in ON_SCRAPE:
        ON_SCRAPE.append(collector)
        REGISTRY.register(collector)


def registry(settings: Settings) -> CollectorRegistry:
    """What to expose: this process's registry, or the sum over the multiprocess folder."""
    if not settings.prometheus_multiproc_dir:
        return REGISTRY
    from prometheus_client import multiprocess

    combined = CollectorRegistry()
    multiprocess.MultiProcessCollector(combined, path=settings.prometheus_multiproc_dir)
    for collector in ON_SCRAPE:
        combined.register(collector)
    return combined


def exposition(settings: Settings) -> tuple[bytes, str]:
    """The Prometheus text for /metrics, and its content type."""
    return generate_latest(registry(settings)), CONTENT_TYPE_LATEST


def serve_metrics(settings: Settings, port: int) -> None:
    """Start prometheus_client's HTTP server on ``port`` (a daemon thread; a greenlet under gevent)."""
    start_http_server(port, addr=settings.metrics_addr, registry=registry(settings))
    log.info("metrics served on %s:%s/metrics", settings.metrics_addr, port)
