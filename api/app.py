"""The Flask application: stateless; every request gets its own database session."""
from __future__ import annotations

import logging

from flask import Flask, g

from api.auth import install_auth
from api.context import reject_nul_args
from api.errors import register_error_handlers
from api.observability import install_observability
from shared.engine.step import build_runtime
from shared.runtime import Runtime
from shared.settings import Settings


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> Flask:
    settings = settings or (runtime.settings if runtime else Settings.from_env())
    runtime = runtime or build_runtime(settings)
    app = Flask("steprun")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["steprun"] = runtime
    from shared.stats import register_queue_metrics

    register_queue_metrics(runtime.sessions)  # queue-latency gauges, computed from Postgres on each scrape

    @app.teardown_request
    def _close_db(_exc: BaseException | None) -> None:
        db = g.pop("db", None)
        if db is not None:
            db.close()

    register_error_handlers(app)
    install_observability(app)  # before auth, so rejected requests are counted and carry an id too
    app.before_request(reject_nul_args)
    install_auth(app)
    from api import openapi, sessions, system, turns

    app.register_blueprint(system.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(sessions.bp)
    app.register_blueprint(turns.bp)
    from api import streaming

    streaming.install(app)
    from api import history, knowledge, memory

    app.register_blueprint(memory.bp)
    app.register_blueprint(knowledge.bp)
    app.register_blueprint(history.bp)
    logging.getLogger(__name__).info("steprun API ready (%s)", "embedded" if settings.embedded else "production")
    return app
