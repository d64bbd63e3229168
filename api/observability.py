"""Per request: an id for the logs (echoed as X-Request-Id) and the request metrics."""
from __future__ import annotations

import re
import secrets
import time

from flask import Flask, Response, g, request

from shared.logs import bind_log_context, reset_log_context
from shared.metrics import HTTP_LATENCY, HTTP_REQUESTS

REQUEST_ID_RE = re.compile(r"[\w.:-]{1,128}", re.ASCII)


def install_observability(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if REQUEST_ID_RE.fullmatch(incoming) else "req_" + secrets.token_hex(8)
        args = request.view_args or {}
        # Bound in the request's own context (a greenlet under gunicorn): nothing leaks to the next request.
        g.log_token = bind_log_context(request_id=g.request_id, session_id=args.get("session_id"),
                                       turn_id=args.get("turn_id"))

    @app.after_request
    def _count(response: Response) -> Response:
        # The route template, never the raw path: ids in paths would make a label per session.
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        HTTP_REQUESTS.labels(method=request.method, route=route, status=str(response.status_code)).inc()
        if "started" in g:
            HTTP_LATENCY.labels(method=request.method, route=route).observe(time.perf_counter() - g.started)
        if "request_id" in g:
            response.headers["X-Request-Id"] = g.request_id
        return response

    @app.teardown_request
    def _forget(_exc: BaseException | None) -> None:
        token = g.pop("log_token", None)
        if token is not None:
            try:
                reset_log_context(token)
            except ValueError:  # torn down in another context (a streamed body): nothing to restore
                pass
