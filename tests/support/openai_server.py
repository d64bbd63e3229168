"""A fake OpenAI: a real HTTP server on loopback speaking OpenAI's streaming chat-completions wire format.

Used by the OpenAIModel unit tests and by the end-to-end test that drives a worker
against it. The ``server`` fixture is registered for every suite by tests/conftest.py.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def chunk(delta=None, finish_reason=None, usage=None, choices=True):
    """One chat.completion.chunk exactly as OpenAI sends it."""
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "gpt-test", "system_fingerprint": "fp_1",
            "choices": [{"index": 0, "delta": delta or {}, "logprobs": None,
                         "finish_reason": finish_reason}] if choices else [],
            "usage": usage}
    return body


def text_stream(pieces, usage=(11, 3)):
    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": p}) for p in pieces]
    out.append(chunk({}, finish_reason="stop"))
    if usage:
        out.append(chunk(choices=False, usage={"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                               "total_tokens": sum(usage)}))
    return out


class Server:
    """Replies with scripted responses, one per request (the last one repeats)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list = []
        self.disconnected = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                i = min(len(server.requests), len(server.script)) - 1
                server.script[i](self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


def respond_stream(chunks, delay=0.0, done=True):
    """A 200 SSE response in chunked transfer encoding, like api.openai.com."""
    def run(h):
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        events = [f"data: {json.dumps(c)}\n\n" for c in chunks] + (["data: [DONE]\n\n"] if done else [])
        try:
            for ev in events:
                data = ev.encode()
                h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                h.wfile.flush()
                time.sleep(delay)
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except OSError:
            h.server_ref.disconnected.set()
        h.close_connection = True
    return run


def respond_error(status, body, headers=()):
    def run(h):
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        h.send_response(status)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        h.close_connection = True
    return run


@pytest.fixture
def server():
    s = Server()
    s.httpd.RequestHandlerClass.server_ref = s
    t = threading.Thread(target=s.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()
