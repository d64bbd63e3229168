"""Typed settings, read once from the environment at each process's entrypoint.

Nothing else in steprun reads ``os.environ``: entrypoints call
:meth:`Settings.from_env` and pass the object down.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """A variable is present but cannot be used."""


@dataclass(frozen=True)
class Setting:
    env: str
    default: Any
    help: str


def _setting(env: str, default: Any, help: str) -> Any:
    return field(default=default, metadata={"env": env, "help": help})


@dataclass(frozen=True)
class Settings:
    # Where state lives. Unset -> embedded mode (SQLite file, in-process queue and bus).
    database_url: str | None = _setting(
        "DATABASE_URL", None, "Postgres URL (postgresql://...). Unset: embedded SQLite file."
    )
    redis_url: str | None = _setting(
        "REDIS_URL", None, "Redis URL for the broker, event log and pub/sub. Unset: in-process queue and bus."
    )
    data_dir: str = _setting(
        "STEPRUN_DATA_DIR", ".steprun", "Embedded mode: folder holding the SQLite file and the dev key."
    )
    agents_module: str | None = _setting(
        "STEPRUN_AGENTS", None, "Module whose AGENTS list is served. Unset: the built-in demo agents."
    )
    openai_base_url: str = _setting(
        "OPENAI_BASE_URL", "https://api.openai.com/v1", "Endpoint of `openai:<model>` agents (any compatible server)."
    )
    openai_api_key: str | None = _setting("OPENAI_API_KEY", None, "Key sent to the `openai:` endpoint.")
    jwt_secret: str | None = _setting("STEPRUN_JWT_SECRET", None, "HS256 secret for end-user JWTs (optional).")
    jwt_public_key: str | None = _setting(
        "STEPRUN_JWT_PUBLIC_KEY", None, "RS256 public key (PEM text) for end-user JWTs (optional)."
    )
    jwt_audience: str | None = _setting("STEPRUN_JWT_AUDIENCE", None, "Required `aud` claim of JWTs, if set.")
    jwt_tenant: str | None = _setting(
        "STEPRUN_JWT_TENANT", None,
        "The one tenant STEPRUN_JWT_SECRET / STEPRUN_JWT_PUBLIC_KEY speak for: a token whose `tid` differs is "
        "401. Required outside `steprun dev` when either is set.",
    )
    jwt_issuers: str | None = _setting(
        "STEPRUN_JWT_ISSUERS", None,
        "JSON object binding JWT issuers to tenants: `{\"<iss>\": {\"tenant\": T, \"secret\": S | "
        "\"public_key\": PEM, \"audience\"?: A}}`. A token whose `iss` is listed is verified with that key "
        "only and must carry `tid` T.",
    )
    jwt_max_lifetime: float = _setting(
        "STEPRUN_JWT_MAX_LIFETIME", 3600.0,
        "Longest lifetime a JWT may claim, seconds: `exp` further than this from now (or from `iat`) is 401.",
    )
    key_cache_seconds: float = _setting(
        "STEPRUN_KEY_CACHE_SECONDS", 30.0,
        "How long a process trusts a verified API key before checking it again (a revoked key works that long); "
        "open WebSocket/SSE streams recheck their key and token within it and close 4401.",
    )
    rate_limit_per_minute: int = _setting(
        "STEPRUN_RATE_LIMIT_PER_MINUTE", 600, "Requests one principal may make per minute (0: no limit)."
    )
    max_queued_turns: int = _setting(
        "STEPRUN_MAX_QUEUED_TURNS", 20, "Turns one principal may have waiting (queued) at once."
    )
    rate_limit_per_key: int = _setting(
        "STEPRUN_RATE_LIMIT_PER_KEY", 3000,
        "Requests one API key may make per minute, whatever X-User-Id it sends (0: no limit).",
    )
    rate_limit_per_tenant: int = _setting(
        "STEPRUN_RATE_LIMIT_PER_TENANT", 6000,
        "Requests all keys and users of one tenant may make per minute (0: no limit).",
    )
    max_queued_turns_per_tenant: int = _setting(
        "STEPRUN_MAX_QUEUED_TURNS_PER_TENANT", 1000,
        "Turns all users of one tenant may have waiting (queued) at once (0: no limit).",
    )
    auth_failures_per_ip: int = _setting(
        "STEPRUN_AUTH_FAILURES_PER_IP", 60,
        "Failed authentications (401) one client address may make per minute; past it every request from it "
        "gets 429 before any key lookup (0: no limit).",
    )
    trusted_proxies: int = _setting(
        "STEPRUN_TRUSTED_PROXIES", 0,
        "Proxies in front of the web process that append to X-Forwarded-For: the client address is the entry "
        "this many from the right. 0: X-Forwarded-For is ignored (the socket's peer is the client).",
    )
    max_running_turns_per_user: int = _setting(
        "STEPRUN_MAX_RUNNING_TURNS_PER_USER", 4,
        "Turns one user may have running (in_progress) at once; more wait queued, in order, without holding "
        "a worker (0: no limit).",
    )
    max_running_turns_per_tenant: int = _setting(
        "STEPRUN_MAX_RUNNING_TURNS_PER_TENANT", 0,
        "Turns all users of one tenant may have running at once; set it to a share of the fleet's worker slots "
        "(0: no limit).",
    )
    redis_max_connections: int = _setting(
        "STEPRUN_REDIS_MAX_CONNECTIONS", 50, "Redis connections per process (callers queue for one when all are busy)."
    )
    redis_prefix: str = _setting("STEPRUN_REDIS_PREFIX", "steprun", "Prefix of every Redis key and channel.")
    queue_name: str = _setting("STEPRUN_QUEUE", "steprun.steps", "Celery queue the step tasks go to.")

    # Workers and recovery.
    lease_seconds: float = _setting(
        "STEPRUN_LEASE_SECONDS", 6.0,
        "A running step's lease; a worker silent this long is presumed dead and its step resumes elsewhere "
        "(the heartbeat keeps a long step's lease; a zombie commits and streams nothing: both are fenced).",
    )
    heartbeat_seconds: float = _setting(
        "STEPRUN_HEARTBEAT_SECONDS", 1.5,
        "How often a running step extends its lease (keep it well under the lease: 4 beats per lease by default).",
    )
    max_attempts: int = _setting(
        "STEPRUN_MAX_ATTEMPTS", 10,
        "Attempts of one step that may die or fail (worker killed, lease lost, transient model error) before the "
        "turn fails with max_attempts; hand-backs (a worker shutting down) do not count.",
    )
    lost_task_seconds: float = _setting(
        "STEPRUN_LOST_TASK_SECONDS", 6.0,
        "A turn waiting for a worker this long with no claim is re-enqueued (its task may be lost), when the "
        "broker's queue cannot be read (embedded mode, or more than 1000 messages waiting).",
    )
    unclaimed_task_seconds: float = _setting(
        "STEPRUN_UNCLAIMED_TASK_SECONDS", 1.0,
        "A step no worker claimed this long whose task is not in the broker's queue (the worker that took it "
        "died, or the message was lost) is re-enqueued; one still waiting in the queue is not sent twice.",
    )
    sweep_interval: float = _setting(
        "STEPRUN_SWEEP_INTERVAL", 1.0,
        "Seconds between scheduler sweeps (expired leases, lost tasks, unpublished events).",
    )
    step_time_limit: float = _setting(
        "STEPRUN_STEP_TIME_LIMIT", 600.0, "Hard cap on one step (model call plus tools), seconds."
    )
    worker_concurrency: int = _setting(
        "STEPRUN_WORKER_CONCURRENCY", 50, "Steps one worker process runs at once (gevent greenlets)."
    )
    shutdown_grace_seconds: float = _setting(
        "STEPRUN_SHUTDOWN_GRACE_SECONDS", 20.0,
        "On SIGTERM a worker lets running steps finish this long, then hands the rest back to the queue.",
    )

    # Long-lived turns and housekeeping (scheduler).
    turn_time_limit: float = _setting(
        "STEPRUN_TURN_TIME_LIMIT", 3600.0,
        "Longest wall time a turn may run (time paused for the user not counted); past it the turn "
        "ends incomplete. 0: no limit.",
    )
    action_timeout_seconds: float = _setting(
        "STEPRUN_ACTION_TIMEOUT_SECONDS", 86400.0,
        "A turn paused in requires_action that nobody resumes within this time becomes expired.",
    )
    session_ttl_seconds: float = _setting(
        "STEPRUN_SESSION_TTL_SECONDS", 0.0,
        "Sessions idle this long (no turn running or paused) are deleted with their history. 0: never.",
    )
    checkpoint_keep: int = _setting(
        "STEPRUN_CHECKPOINT_KEEP", 20,
        "Checkpoints kept per session; older ones are pruned (a step only loads the latest). 0: keep all.",
    )
    history_cache_messages: int = _setting(
        "STEPRUN_HISTORY_CACHE_MESSAGES", 100_000,
        "Messages of session histories a worker keeps from the checkpoints it wrote, so that a session's "
        "next step reads one id instead of its history (shared/checkpoints.py). 0: read it every step.",
    )
    lifecycle_interval: float = _setting(
        "STEPRUN_LIFECYCLE_INTERVAL", 60.0,
        "Seconds between the scheduler's housekeeping rounds (session expiry, checkpoint pruning, "
        "stale broker messages).",
    )

    # Delayed and scheduled turns, webhooks (scheduler).
    schedule_min_seconds: int = _setting(
        "STEPRUN_SCHEDULE_MIN_SECONDS", 60, "Smallest `every_seconds` a schedule may have."
    )
    schedule_poll_seconds: float = _setting(
        "STEPRUN_SCHEDULE_POLL_SECONDS", 0.5,
        "How often the scheduler looks for due schedules and delayed turns (a run starts this late at most, "
        "plus the queue's latency).",
    )
    webhook_allow_private: bool = _setting(
        "STEPRUN_WEBHOOK_ALLOW_PRIVATE", False,
        "Allow webhook URLs that resolve to private, loopback or link-local addresses (tests, private networks).",
    )
    webhook_poll_seconds: float = _setting(
        "STEPRUN_WEBHOOK_POLL_SECONDS", 1.0, "How often the scheduler sends due webhook deliveries."
    )
    webhook_timeout_seconds: float = _setting(
        "STEPRUN_WEBHOOK_TIMEOUT_SECONDS", 10.0,
        "Longest one webhook delivery may take (connect plus response); past it the attempt failed.",
    )
    webhook_retry_base_seconds: float = _setting(
        "STEPRUN_WEBHOOK_RETRY_BASE_SECONDS", 5.0,
        "Wait after a delivery's first failed attempt; each further failure doubles it (with +-25% jitter).",
    )
    webhook_retry_max_seconds: float = _setting(
        "STEPRUN_WEBHOOK_RETRY_MAX_SECONDS", 3600.0, "Longest wait between two attempts of one delivery."
    )
    webhook_retry_window_seconds: float = _setting(
        "STEPRUN_WEBHOOK_RETRY_WINDOW_SECONDS", 86400.0,
        "A delivery is retried for at least this long after its event; the first failure after it marks it failed.",
    )
    webhook_retention_seconds: float = _setting(
        "STEPRUN_WEBHOOK_RETENTION_SECONDS", 604800.0,
        "Delivered and failed webhook deliveries (the delivery log) and sent outbox events are kept this long.",
    )
    webhook_concurrency: int = _setting(
        "STEPRUN_WEBHOOK_CONCURRENCY", 8, "Webhook deliveries one scheduler sends at once."
    )
    # Model calls (the `openai:` models): one retry budget per step.
    model_retry_attempts: int = _setting(
        "STEPRUN_MODEL_RETRY_ATTEMPTS", 4,
        "Requests one step may make to the model provider (429, 5xx, network errors are retried within it).",
    )
    model_retry_seconds: float = _setting(
        "STEPRUN_MODEL_RETRY_SECONDS", 30.0,
        "Longest a step keeps retrying the model provider (backoff with jitter, Retry-After honoured); past it "
        "the turn fails with the provider's last error.",
    )
    model_request_timeout: float = _setting(
        "STEPRUN_MODEL_REQUEST_TIMEOUT", 60.0,
        "Longest the model provider may stay silent (connecting, before the first token, between tokens), seconds.",
    )
    # Tool effects and budgets.
    tool_outcome_unknown: str = _setting(
        "STEPRUN_TOOL_OUTCOME_UNKNOWN", "pause",
        "A tool call left started by a dead attempt, of a tool not marked idempotent: `pause` (the turn waits in "
        "requires_action, reason tool_outcome_unknown, for retry or skip) or `fail` (the turn fails).",
    )
    budget_user_tokens_per_day: int = _setting(
        "STEPRUN_BUDGET_USER_TOKENS_PER_DAY", 0, "Model tokens (in + out) one user may spend per UTC day. 0: no limit."
    )
    budget_user_tokens_per_month: int = _setting(
        "STEPRUN_BUDGET_USER_TOKENS_PER_MONTH", 0, "Model tokens one user may spend per UTC month. 0: no limit."
    )
    budget_tenant_tokens_per_day: int = _setting(
        "STEPRUN_BUDGET_TENANT_TOKENS_PER_DAY", 0,
        "Model tokens all users of a tenant may spend per UTC day. 0: no limit.",
    )
    budget_tenant_tokens_per_month: int = _setting(
        "STEPRUN_BUDGET_TENANT_TOKENS_PER_MONTH", 0,
        "Model tokens all users of a tenant may spend per UTC month. 0: no limit.",
    )
    budget_model_calls_per_turn: int = _setting(
        "STEPRUN_BUDGET_MODEL_CALLS_PER_TURN", 0,
        "Model calls one turn may make (retried attempts included). 0: no limit.",
    )
    budget_tool_calls_per_turn: int = _setting(
        "STEPRUN_BUDGET_TOOL_CALLS_PER_TURN", 0, "Tool executions one turn may make. 0: no limit."
    )
    budget_wait_seconds: float = _setting(
        "STEPRUN_BUDGET_WAIT_SECONDS", 30.0,
        "Near a token budget's end, a model call waits up to this long for the calls in flight to finish "
        "(so concurrent calls cannot overshoot it) before the turn ends incomplete.",
    )

    # Limits.
    max_body_bytes: int = _setting("STEPRUN_MAX_BODY_BYTES", 1_048_576, "Largest request body accepted.")
    max_input_chars: int = _setting("STEPRUN_MAX_INPUT_CHARS", 100_000, "Largest turn input, in characters.")
    max_metadata_bytes: int = _setting("STEPRUN_MAX_METADATA_BYTES", 16_384, "Largest session metadata, JSON-encoded.")
    max_wait_seconds: float = _setting("STEPRUN_MAX_WAIT_SECONDS", 60.0, "Longest ?wait= a client may ask for.")
    max_streams_per_user: int = _setting(
        "STEPRUN_MAX_STREAMS_PER_USER", 20,
        "Streams one user may hold open at once across every API process: WebSockets, SSE streams and "
        "`?wait=` long-polls. One more is refused (429, or WebSocket close 4429). 0: no limit.",
    )
    max_streams_per_tenant: int = _setting(
        "STEPRUN_MAX_STREAMS_PER_TENANT", 10_000,
        "Streams all users of one tenant may hold open at once (the same count, per tenant). 0: no limit.",
    )
    stream_slot_seconds: float = _setting(
        "STEPRUN_STREAM_SLOT_SECONDS", 30.0,
        "Lease of one counted stream in Redis, renewed while its process lives: the streams of a killed "
        "process stop counting this long after it died.",
    )
    header_timeout: float = _setting(
        "STEPRUN_HEADER_TIMEOUT", 10.0,
        "Longest a client may take to send a request's line and headers, from its first byte (gunicorn web "
        "process); past it the connection is closed. An idle keep-alive connection waits up to gunicorn's "
        "keepalive (95 s) before that first byte. 0: only keepalive bounds it.",
    )
    body_timeout: float = _setting(
        "STEPRUN_BODY_TIMEOUT", 30.0,
        "Longest a client may take to send a request's body, from the end of its headers (gunicorn web "
        "process); past it the request is answered 408 and the connection closed. 0: no limit.",
    )
    ws_frames_per_second: float = _setting(
        "STEPRUN_WS_FRAMES_PER_SECOND", 20.0,
        "Frames one WebSocket client may send per second, in bursts of up to twice that; every frame counts "
        "(pings, malformed and oversized ones too). Past it the socket is closed with 1008. 0: no limit.",
    )

    # Streaming and retention.
    event_retention_seconds: int = _setting(
        "STEPRUN_EVENT_RETENTION_SECONDS", 3600, "How long a session's event log is kept after its last event."
    )
    event_log_max: int = _setting(
        "STEPRUN_EVENT_LOG_MAX", 100_000, "Most events kept per session log (older ones trimmed)."
    )
    delta_flush_seconds: float = _setting(
        "STEPRUN_DELTA_FLUSH_SECONDS", 0.03, "Deltas are batched into one event at most this often."
    )
    secret_key: str | None = _setting(
        "STEPRUN_SECRET_KEY", None,
        "Signs short-lived stream tokens (HMAC): 32+ random bytes, the same on every web process. Unset: "
        "`steprun dev` makes one in its data dir; a production process refuses to start without it (web) or "
        "with a placeholder or shorter one.",
    )
    stream_token_ttl: float = _setting(
        "STEPRUN_STREAM_TOKEN_TTL", 300.0, "Seconds a stream token (for browser WebSocket/SSE) stays valid."
    )
    sse_heartbeat_seconds: float = _setting(
        "STEPRUN_SSE_HEARTBEAT_SECONDS", 15.0, "An SSE stream silent this long gets a `:` comment line."
    )
    ws_ping_seconds: float = _setting(
        "STEPRUN_WS_PING_SECONDS", 25.0,
        "WebSocket ping interval; a client that misses a pong is disconnected. Must be above 0.",
    )
    stream_buffer: int = _setting(
        "STEPRUN_STREAM_BUFFER", 256,
        "Events a stream connection takes from the log at a time: its bounded buffer. Consecutive deltas "
        "in it are coalesced.",
    )
    stream_slow_seconds: float = _setting(
        "STEPRUN_STREAM_SLOW_SECONDS", 5.0,
        "A stream client that has not caught up with the log for this long (a full buffer waiting each time) "
        "is closed with its cursor, to reconnect from it.",
    )
    stream_send_timeout: float = _setting(
        "STEPRUN_STREAM_SEND_TIMEOUT", 10.0,
        "Longest one write to a stream client may block; past it the connection is dropped (the client "
        "resumes from its last cursor).",
    )
    stream_send_buffer: int = _setting(
        "STEPRUN_STREAM_SEND_BUFFER", 0,
        "Kernel send buffer (SO_SNDBUF) of a stream connection in bytes; 0 keeps the OS default (up to "
        "megabytes). Smaller pins less kernel memory per stalled client and notices it sooner.",
    )
    langgraph_chunks: str = _setting(
        "STEPRUN_LANGGRAPH_CHUNKS", "live",
        "LangGraph `messages-tuple` chunks: `live` (tokens as they stream; a retried step sends only text "
        "past what the client has) or `committed` (a step's text once it commits: always equal to the history).",
    )

    # Memory, knowledge and observability.
    max_memory_value_bytes: int = _setting(
        "STEPRUN_MAX_MEMORY_VALUE_BYTES", 65_536, "Largest memory value, JSON-encoded."
    )
    max_document_chars: int = _setting(
        "STEPRUN_MAX_DOCUMENT_CHARS", 500_000, "Largest knowledge document, in characters."
    )
    quota_user_documents: int = _setting(
        "STEPRUN_QUOTA_USER_DOCUMENTS", 1000, "Knowledge documents one user may keep (0: no limit)."
    )
    quota_tenant_documents: int = _setting(
        "STEPRUN_QUOTA_TENANT_DOCUMENTS", 100_000,
        "Knowledge documents one tenant may keep, its users' and tenant-wide ones together (0: no limit).",
    )
    quota_user_document_bytes: int = _setting(
        "STEPRUN_QUOTA_USER_DOCUMENT_BYTES", 50_000_000,
        "Bytes of knowledge document text (UTF-8) one user may keep (0: no limit).",
    )
    quota_tenant_document_bytes: int = _setting(
        "STEPRUN_QUOTA_TENANT_DOCUMENT_BYTES", 1_000_000_000,
        "Bytes of knowledge document text one tenant may keep (0: no limit).",
    )
    quota_user_memory_items: int = _setting(
        "STEPRUN_QUOTA_USER_MEMORY_ITEMS", 10_000, "Memory items one user may keep (0: no limit)."
    )
    quota_tenant_memory_items: int = _setting(
        "STEPRUN_QUOTA_TENANT_MEMORY_ITEMS", 1_000_000, "Memory items all users of one tenant may keep (0: no limit)."
    )
    quota_user_history_bytes: int = _setting(
        "STEPRUN_QUOTA_USER_HISTORY_BYTES", 50_000_000,
        "Bytes of turn input (UTF-8) one user's kept sessions may hold; deleting sessions frees it (0: no limit).",
    )
    quota_tenant_history_bytes: int = _setting(
        "STEPRUN_QUOTA_TENANT_HISTORY_BYTES", 0,
        "Bytes of turn input all users of one tenant may hold (0: no limit). Checked by summing the tenant's "
        "turns at each new turn: set it where a tenant's history is bounded.",
    )
    knowledge_chunk_chars: int = _setting(
        "STEPRUN_KNOWLEDGE_CHUNK_CHARS", 1200,
        "Knowledge documents are cut into chunks of at most this many characters.",
    )
    embedder: str | None = _setting(
        "STEPRUN_EMBEDDER", None,
        "Optional `module:attr` building an embedder (see shared/storage/embeddings.py); unset: full-text search only.",
    )
    vector_scan_limit: int = _setting(
        "STEPRUN_VECTOR_SCAN_LIMIT", 5000, "With an embedder: how many of the newest chunks a search compares."
    )
    log_format: str = _setting("STEPRUN_LOG_FORMAT", "text", "`text` or `json` (one object per line, with ids).")
    metrics_addr: str = _setting(
        "STEPRUN_METRICS_ADDR", "0.0.0.0", "Address the worker's and scheduler's metrics servers bind to."
    )
    worker_metrics_port: int = _setting(
        "STEPRUN_WORKER_METRICS_PORT", 0, "Port of the worker's Prometheus /metrics server; 0: off."
    )
    scheduler_metrics_port: int = _setting(
        "STEPRUN_SCHEDULER_METRICS_PORT", 0, "Port of the scheduler's Prometheus /metrics server; 0: off."
    )
    prometheus_multiproc_dir: str | None = _setting(
        "PROMETHEUS_MULTIPROC_DIR", None,
        "prometheus_client's multiprocess folder; set it when one /metrics must sum several processes "
        "(gunicorn -w N, Celery prefork).",
    )
    otel_endpoint: str | None = _setting(
        "STEPRUN_OTEL_ENDPOINT", None,
        "OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); needs the `otel` extra. Unset: off.",
    )

    # The console (/console) and the fleet figures it shows.
    console_session_seconds: float = _setting(
        "STEPRUN_CONSOLE_SESSION_SECONDS", 43_200.0,
        "How long a console sign-in lasts; revoking the admin key ends its sessions at once.",
    )
    console_secure_cookie: bool = _setting(
        "STEPRUN_CONSOLE_SECURE_COOKIE", False,
        "Mark the console's cookies Secure even when the request reached the web process over plain HTTP "
        "(TLS ended at a proxy). Requests made over HTTPS always get Secure cookies.",
    )
    worker_beat_seconds: float = _setting(
        "STEPRUN_WORKER_BEAT_SECONDS", 5.0,
        "How often each worker process renews its row in worker_heartbeats (the console's workers alive).",
    )
    queue_sample_seconds: float = _setting(
        "STEPRUN_QUEUE_SAMPLE_SECONDS", 30.0,
        "How often the scheduler records the queue's figures for the console's last-hour chart.",
    )

    # Database pool (per process).
    db_pool_size: int = _setting("STEPRUN_DB_POOL_SIZE", 10,
                                  "Connections each pool of a process keeps open when quiet.")
    db_max_overflow: int = _setting("STEPRUN_DB_MAX_OVERFLOW", 10,
                                     "Extra connections a pool may open in a burst; closed once it has "
                                     "not needed them for 60 s.")
    db_ping_idle_seconds: float = _setting(
        "STEPRUN_DB_PING_IDLE_SECONDS", 10.0,
        "A pooled connection idle longer than this is pinged (SELECT 1) before use; one in steady use is not "
        "(a dead one fails its statement and the pool reconnects). 0: ping at every checkout.")
    db_role: str = _setting(
        "STEPRUN_DB_ROLE", "steprun_app",
        "The Postgres login user data is read and written as (row-level security binds it): created by "
        "`steprun migrate` with a password derived from DATABASE_URL's, on the same host and database. DATABASE_URL's "
        "own login is kept for migrations and the system path (claim, sweeps, key lookup). `none`: one login for "
        "everything and no row-level security, refused outside `steprun dev`.",
    )
    app_database_url: str | None = _setting(
        "STEPRUN_APP_DATABASE_URL", None,
        "The application login's URL, where `steprun migrate` may not create roles (Heroku Postgres: a "
        "`pg:credentials` credential); migrate grants it what it needs. Unset: derived from DATABASE_URL and "
        "STEPRUN_DB_ROLE.",
    )

    # Serving.
    host: str = _setting("STEPRUN_HOST", "127.0.0.1", "Address `steprun dev` listens on.")
    port: int = _setting("PORT", 8000, "Port the web process listens on.")
    log_level: str = _setting("STEPRUN_LOG_LEVEL", "INFO", "Logging level.")

    def __post_init__(self) -> None:
        if self.tool_outcome_unknown not in ("pause", "fail"):
            raise SettingsError(f"STEPRUN_TOOL_OUTCOME_UNKNOWN={self.tool_outcome_unknown!r}: expected pause or fail")
        parse_jwt_issuers(self.jwt_issuers)  # a bad mapping stops every process at start, not a request later
        if self.jwt_max_lifetime <= 0:
            raise SettingsError(f"STEPRUN_JWT_MAX_LIFETIME={self.jwt_max_lifetime!r}: expected seconds above 0")

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.redis_url is None

    @property
    def sqlalchemy_url(self) -> str:
        """The URL handed to SQLAlchemy (Heroku's postgres:// scheme normalised): the owner's login."""
        if self.database_url is None:
            return "sqlite:///" + os.path.abspath(os.path.join(self.data_dir, "steprun.db"))
        return _driver_url(self.database_url)

    @property
    def app_sqlalchemy_url(self) -> str | None:
        """The application login's URL (row-level security binds it), or None where there is none.

        None on SQLite and with ``STEPRUN_DB_ROLE=none``. Otherwise STEPRUN_APP_DATABASE_URL, or
        DATABASE_URL with its user replaced by ``db_role`` and the password :func:`app_login_password`.
        """
        if self.database_url is None or not self.sqlalchemy_url.startswith("postgresql"):
            return None
        if self.app_database_url:
            return _driver_url(self.app_database_url)
        if self.db_role in ("", "none"):
            return None
        from sqlalchemy.engine import make_url

        owner = make_url(self.sqlalchemy_url)
        return owner.set(username=self.db_role, password=app_login_password(owner.password, self.db_role)) \
            .render_as_string(hide_password=False)

    def check_deployment(self, process: str) -> None:
        """Refuse a half-configured production process (web, worker, scheduler), naming what is missing.

        Outside `steprun dev` the processes share state through Postgres and Redis: one without the other
        would run the embedded mode inside each process, and events would appear or vanish depending on
        which process answers. The web process also needs STEPRUN_SECRET_KEY (stream tokens).
        """
        missing = [name for name, value in (("DATABASE_URL", self.database_url), ("REDIS_URL", self.redis_url))
                   if not value]
        if missing and len(missing) == 2:
            raise SettingsError(
                f"the {process} process needs DATABASE_URL and REDIS_URL (neither is set); for one local "
                "process on a SQLite file, run `steprun dev` instead")
        if missing:
            present = "REDIS_URL" if missing[0] == "DATABASE_URL" else "DATABASE_URL"
            raise SettingsError(f"{present} is set but {missing[0]} is not: the {process} process needs both "
                                "(or neither, with `steprun dev`)")
        if process == "web" and not self.secret_key:
            raise SettingsError(
                "STEPRUN_SECRET_KEY is not set: the web process signs stream tokens with it; give every web "
                f"process the same long random value (e.g. {MAKE_SECRET})")
        if self.secret_key:
            _check_secret("STEPRUN_SECRET_KEY", self.secret_key)
        if self.jwt_secret:
            _check_secret("STEPRUN_JWT_SECRET", self.jwt_secret)
        for issuer, bound in parse_jwt_issuers(self.jwt_issuers).items():
            if bound.secret:
                _check_secret(f"the secret of JWT issuer {issuer!r} (STEPRUN_JWT_ISSUERS)", bound.secret)
        if (self.jwt_secret or self.jwt_public_key) and not self.jwt_tenant:
            raise SettingsError(
                "STEPRUN_JWT_SECRET / STEPRUN_JWT_PUBLIC_KEY is set but STEPRUN_JWT_TENANT is not: a JWT key must "
                "speak for one tenant, or any token it signs could name any tenant in `tid`. Set "
                "STEPRUN_JWT_TENANT to that tenant, or bind each issuer to its tenant in STEPRUN_JWT_ISSUERS")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(f.name, f.metadata["env"], raw, f.default)
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _driver_url(url: str) -> str:
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def app_login_password(owner_password: str | None, role: str) -> str | None:
    """The application login's password: derived from the owner's, so a single DATABASE_URL configures both.

    ``steprun migrate`` sets it and every process computes it; a rotated owner password is picked up by the
    next migrate. None when the owner's URL has no password (trust, peer or certificate authentication).
    """
    if not owner_password:
        return None
    import hashlib
    import hmac

    return hmac.new(str(owner_password).encode(), f"steprun application login {role}".encode(),
                    hashlib.sha256).hexdigest()
# How an operator makes a secret: printed by every refusal.
MAKE_SECRET = "`python -c 'import secrets; print(secrets.token_hex(32))'`"
MIN_SECRET_BYTES = 32
# Values shipped in this repository's examples (infra/, docs): never a real secret.
_PLACEHOLDER_MARKS = ("change-me", "changeme", "change_me", "replace-me", "placeholder", "your-secret")


def _check_secret(name: str, value: str) -> None:
    """Refuse a placeholder or a short secret outside `steprun dev`, saying how to make one."""
    lowered = value.lower()
    if any(mark in lowered for mark in _PLACEHOLDER_MARKS):
        raise SettingsError(f"{name} is a placeholder value from an example; set a long random value "
                            f"(e.g. {MAKE_SECRET})")
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise SettingsError(f"{name} is {len(value.encode())} bytes long; it must be at least {MIN_SECRET_BYTES} "
                            f"bytes of random (e.g. {MAKE_SECRET})")


@dataclass(frozen=True)
class JwtIssuer:
    """One entry of STEPRUN_JWT_ISSUERS: the tenant an issuer speaks for and the key its tokens are signed with."""

    tenant: str
    secret: str | None = None
    public_key: str | None = None
    audience: str | None = None


def parse_jwt_issuers(raw: str | None) -> dict[str, JwtIssuer]:
    """STEPRUN_JWT_ISSUERS as {iss: JwtIssuer}; SettingsError naming what is wrong."""
    if not raw:
        return {}
    import json

    where = "STEPRUN_JWT_ISSUERS"
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise SettingsError(f"{where} is not JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise SettingsError(f"{where} must be a JSON object {{\"<iss>\": {{\"tenant\": ..., \"secret\" or "
                            "\"public_key\": ...}}}}")
    issuers: dict[str, JwtIssuer] = {}
    for iss, entry in data.items():
        if not iss or not isinstance(entry, dict):
            raise SettingsError(f"{where}[{iss!r}] must be an object with 'tenant' and 'secret' or 'public_key'")
        unknown = set(entry) - {"tenant", "secret", "public_key", "audience"}
        if unknown:
            raise SettingsError(f"{where}[{iss!r}]: unknown field(s) {', '.join(sorted(unknown))}")
        tenant, secret, public_key = entry.get("tenant"), entry.get("secret"), entry.get("public_key")
        audience = entry.get("audience")
        if not isinstance(tenant, str) or not tenant:
            raise SettingsError(f"{where}[{iss!r}].tenant must name the tenant this issuer speaks for")
        if (secret is None) == (public_key is None):
            raise SettingsError(f"{where}[{iss!r}] needs exactly one of 'secret' (HS256) and 'public_key' (RS256)")
        if not all(v is None or (isinstance(v, str) and v) for v in (secret, public_key, audience)):
            raise SettingsError(f"{where}[{iss!r}]: 'secret', 'public_key' and 'audience' must be non-empty strings")
        issuers[iss] = JwtIssuer(tenant, secret, public_key, audience)
    return issuers


def deployment_settings(process: str, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of a production entrypoint; a configuration error is one line on stderr and exit 3."""
    def _load() -> Settings:
        settings = Settings.from_env(environ)
        settings.check_deployment(process)
        return settings

    return or_exit(process, _load)


def or_exit(process: str, build: Callable[[], T]) -> T:
    """``build()``, or, on a configuration error (an unsafe database login, say), one line on stderr and exit 3."""
    import sys

    try:
        return build()
    except SettingsError as exc:
        sys.stderr.write(f"steprun {process}: configuration error: {exc}\n")
        sys.stderr.flush()
        raise SystemExit(3) from None


def _coerce(name: str, env: str, raw: str, default: Any) -> Any:
    kind = type(default)
    try:
        if kind is bool:
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise SettingsError(f"{env}={raw!r}: expected a {kind.__name__}") from None
    return raw


def documented_settings() -> list[Setting]:
    """Every variable steprun reads, for the README table and `steprun settings`."""
    return [
        Setting(f.metadata["env"], f.default, f.metadata["help"]) for f in dataclasses.fields(Settings)
    ]
