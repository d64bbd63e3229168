"""The Flask application: stateless; every request gets its own database session."""
from __future__ import annotations

import logging

from flask import Blueprint, Flask, g
from flask.json.provider import DefaultJSONProvider

from api import (
    console,
    history,
    knowledge,
    langgraph,
    memory,
    openapi,
    schedules,
    sessions,
    streaming,
    system,
    turns,
    usage,
    webhooks,
)
from api.auth import install_auth
from api.errors import register_error_handlers
from api.input_gate import gate_request
from api.known_turns import KnownTurns
from api.observability import install_observability
from api.openai_compat import conversations as openai_conversations
from api.openai_compat import docs as openai_docs
from api.openai_compat import responses as openai_responses
from api.openapi import OpenAPIRegistry, RouteDocs
from shared.engine.step import build_runtime
from shared.runtime import Runtime
from shared.settings import Settings
from shared.stats import register_queue_metrics
from shared.turns.budgets import register_usage_metrics


class _JSONProvider(DefaultJSONProvider):
    sort_keys = False  # bodies keep the order they are written in (id first)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> Flask:
    settings = settings or (runtime.settings if runtime else Settings.from_env())
    runtime = runtime or build_runtime(settings)
    app = Flask("steprun")
    app.json = _JSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["steprun"] = runtime
    app.extensions["steprun.known_turns"] = KnownTurns()  # a long-poll's session, without a read first
    register_queue_metrics(runtime.sessions)  # queue-latency gauges, computed from Postgres on each scrape
    register_usage_metrics(runtime.sessions, settings)  # spending per tenant, likewise

    @app.teardown_request
    def _close_db(_exc: BaseException | None) -> None:
        db = g.pop("db", None)
        if db is not None:
            db.close()

    register_error_handlers(app)
    install_observability(app)  # before auth, so rejected requests are counted and carry an id too
    app.before_request(gate_request)  # before auth: a NUL in a path id never reaches a query
    install_auth(app)

    # Every blueprint is registered with the description of its routes; /openapi.json is built from them.
    docs = OpenAPIRegistry()

    def register(blueprint: Blueprint, described: RouteDocs) -> None:
        app.register_blueprint(blueprint)
        docs.add(described)

    register(system.bp, system.describe())
    register(openapi.bp, openapi.describe())
    register(sessions.bp, sessions.describe(agent.name for agent in runtime.agents))
    register(turns.bp, turns.describe())
    streaming.install(app)  # its blueprint, with the WebSocket server's options
    docs.add(streaming.describe())
    register(memory.bp, memory.describe())
    register(knowledge.bp, knowledge.describe())
    register(history.bp, history.describe())
    register(schedules.bp, schedules.describe())
    register(webhooks.bp, webhooks.describe())
    # The OpenAI Responses + Conversations API (DESIGN 10.1), described together.
    app.register_blueprint(openai_responses.bp)
    app.register_blueprint(openai_conversations.bp)
    docs.add(openai_docs.describe())
    app.register_blueprint(console.bp)  # the operator's web pages (/console): not part of the API document
    langgraph.install(app)  # its blueprint at /langgraph, with LangGraph's error shape
    docs.add(langgraph.describe())
    register(usage.bp, usage.describe())
    app.extensions[openapi.EXTENSION] = docs.document()
    logging.getLogger(__name__).info("steprun API ready (%s)", "embedded" if settings.embedded else "production")
    return app
