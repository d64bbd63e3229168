"""Trace export to an OpenTelemetry collector (OTLP/HTTP), against a stand-in collector that decodes what it gets."""
from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from shared.auth.principal import Principal
from shared.db import unit_of_work
from shared.engine import otel
from shared.engine.otel import trace_id_for
from shared.engine.step import build_runtime
from shared.migrate import upgrade
from shared.settings import Settings
from shared.turns import service as turns

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2",
                                    reason="the otel extra is not installed")


@pytest.fixture
def collector() -> Iterator[tuple[str, list[Any]]]:
    received: list[Any] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = trace_service.ExportTraceServiceRequest()
            request.ParseFromString(body)
            received.append(request)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1/traces", received
    server.shutdown()


def test_a_turns_spans_reach_the_collector_as_one_trace(collector: tuple[str, list[Any]], tmp_path: Path) -> None:
    endpoint, received = collector
    settings = Settings(data_dir=str(tmp_path), otel_endpoint=endpoint)
    rt = build_runtime(settings)
    upgrade(rt.engine)
    who = Principal(f"t-{secrets.token_hex(4)}", "u-otel")
    try:
        with unit_of_work(rt.sessions, who) as db:
            session = turns.create_session(db, rt, who, "math", {})
            turn, _ = turns.create_turn(db, rt, who, session.id, "add 4 and 5")
        deadline = time.time() + 20
        while time.time() < deadline:
            with unit_of_work(rt.sessions, who) as db:
                if turns.get_turn(db, who, turn.id).status == "completed":
                    break
            time.sleep(0.05)
        assert otel.flush(settings)
    finally:
        rt.close()
    spans = [span for request in received for rs in request.resource_spans for ss in rs.scope_spans
             for span in ss.spans]
    assert sorted(s.name for s in spans) == ["add", "scripted", "scripted", "step 0", "step 1"]
    assert {s.trace_id.hex() for s in spans} == {trace_id_for(turn.id)}
    steps = {s.span_id: s for s in spans if s.name.startswith("step ")}
    tool = next(s for s in spans if s.name == "add")
    assert tool.parent_span_id in steps and steps[tool.parent_span_id].name == "step 0"
    assert steps[tool.parent_span_id].start_time_unix_nano <= tool.start_time_unix_nano <= tool.end_time_unix_nano
    attributes = {a.key: a.value for a in tool.attributes}
    assert attributes["steprun.turn_id"].string_value == turn.id
    assert attributes["steprun.arguments"].string_value == '{"a": 4, "b": 5}'
    resource = {a.key: a.value.string_value for a in received[0].resource_spans[0].resource.attributes}
    assert resource["service.name"] == "steprun"
