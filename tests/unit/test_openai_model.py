"""OpenAIModel against a real HTTP server on loopback speaking OpenAI's streaming wire format."""
from __future__ import annotations

import pytest

from shared.llm.base import ModelError, TransientModelError
from shared.llm.openai import OpenAIModel, from_spec
from tests.support.openai_server import chunk, respond_error, respond_stream, text_stream

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
MESSAGES = [{"role": "user", "content": "hi"}]


def model(server, **kw):
    kw.setdefault("backoff_base", 0.001)
    kw.setdefault("timeout", 2.0)
    return OpenAIModel("gpt-test", base_url=server.base_url, api_key="sk-test", **kw)


def test_text_streams_in_order_with_usage_and_request_body(server):
    server.script = [respond_stream(text_stream(["Hel", "lo", ", wor", "ld"]))]
    deltas = []
    resp = model(server).generate(MESSAGES, TOOLS, deltas.append, max_output_tokens=50)

    assert deltas == ["Hel", "lo", ", wor", "ld"]
    assert resp.text == "Hello, world"
    assert resp.finish_reason == "stop"
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (11, 3)
    assert resp.tool_calls == []
    assert resp.time_to_first_token is not None and 0 <= resp.time_to_first_token < 2
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "gpt-test" and body["messages"] == MESSAGES
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["tools"] == TOOLS and body["max_tokens"] == 50


def test_no_tools_key_when_empty_and_usage_estimated_without_usage_chunk(server):
    server.script = [respond_stream(text_stream(["a", "b", "c"], usage=None))]
    resp = from_spec("gpt-test", base_url=server.base_url, api_key=None).generate(MESSAGES, [], lambda d: None)
    assert resp.text == "abc" and resp.usage.output_tokens == 3
    body = server.requests[0]["body"]
    assert "tools" not in body and "max_tokens" not in body
    assert "Authorization" not in server.requests[0]["headers"]


def test_tool_call_split_across_chunks_is_reassembled(server):
    def tc(index, args, id=None, name=None):
        frag = {"index": index, "function": {"arguments": args}}
        if id:
            frag.update(id=id, type="function")
            frag["function"]["name"] = name
        return chunk({"tool_calls": [frag]})

    server.script = [respond_stream([
        chunk({"role": "assistant", "content": None}),
        tc(0, "", id="call_abc", name="get_weather"),
        tc(0, '{"ci'), tc(0, 'ty": "Par'), tc(0, 'is"}'),
        tc(1, "", id="call_def", name="get_weather"),
        tc(1, '{"city": '), tc(1, "oops"),  # invalid JSON from the model
        chunk({}, finish_reason="tool_calls"),
        chunk(choices=False, usage={"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}),
    ])]
    deltas = []
    resp = model(server).generate(MESSAGES, TOOLS, deltas.append)

    assert deltas == [] and resp.text == ""
    assert resp.finish_reason == "tool_calls"
    assert [(c.id, c.name) for c in resp.tool_calls] == [("call_abc", "get_weather"), ("call_def", "get_weather")]
    assert resp.tool_calls[0].arguments == {"city": "Paris"}
    assert resp.tool_calls[1].arguments == {"_raw": '{"city": oops'}
    assert resp.usage.output_tokens == 9
    assert resp.time_to_first_token is not None


def test_429_then_success_is_retried(server):
    server.script = [
        respond_error(429, {"error": {"message": "Rate limit reached"}}, headers=[("Retry-After", "7")]),
        respond_stream(text_stream(["ok"])),
    ]
    m = model(server)
    m._rand = lambda: 0.0  # no jitter on top of Retry-After
    slept = []
    m._sleep = slept.append  # Retry-After: 7 must be honoured, without the test waiting 7 s
    resp = m.generate(MESSAGES, [], lambda d: None)
    assert resp.text == "ok"
    assert len(server.requests) == 2
    assert slept == [7.0]


def test_500_forever_spends_the_attempts_then_fails_the_turn(server):
    server.script = [respond_error(500, {"error": {"message": "server on fire"}})]
    m = model(server, max_retries=3, backoff_base=0.01)
    m._rand = lambda: 1.0  # the top of each jitter window: the exponential caps themselves
    slept = []
    m._sleep = slept.append
    # A ModelError, not a TransientModelError: the queue must not re-run the step (and its budget).
    with pytest.raises(ModelError, match="gave up after 4 request.*server on fire") as err:
        m.generate(MESSAGES, [], lambda d: None)
    assert not isinstance(err.value, TransientModelError)
    assert len(server.requests) == 4  # the first attempt + 3 retries
    assert slept == pytest.approx([0.01, 0.02, 0.04])


def test_backoff_is_jittered(server):
    server.script = [respond_error(500, {"error": {"message": "down"}})]
    m = model(server, max_retries=3, backoff_base=1.0)
    draws = iter([0.5, 0.25, 0.1])
    m._rand = lambda: next(draws)
    slept = []
    m._sleep = slept.append
    with pytest.raises(ModelError):
        m.generate(MESSAGES, [], lambda d: None)
    assert slept == pytest.approx([0.5 * 1.0, 0.25 * 2.0, 0.1 * 4.0])  # a random share of 1, 2, 4 s


def test_retry_after_beyond_the_budget_fails_at_once(server):
    server.script = [respond_error(503, b"overloaded", headers=[("Retry-After", "3600")])]
    m = model(server, max_retries=5)
    slept = []
    m._sleep = slept.append
    with pytest.raises(ModelError, match="overloaded"):
        m.generate(MESSAGES, [], lambda d: None)
    assert slept == [] and len(server.requests) == 1


def test_the_budget_in_seconds_bounds_the_retries(server):
    server.script = [respond_error(500, {"error": {"message": "down"}})]
    m = model(server, max_retries=1000, backoff_base=0.05, budget_seconds=0.5)
    with pytest.raises(ModelError, match="gave up"):
        m.generate(MESSAGES, [], lambda d: None)
    # Backoff from 0.05 s doubling, within half a second: a handful of requests, not a thousand.
    assert 2 <= len(server.requests) <= 12


def test_settings_set_the_budget_and_timeout():
    from shared.llm import build_model
    from shared.settings import Settings

    m = build_model("openai:gpt-x", Settings(model_retry_attempts=2, model_retry_seconds=5.0,
                                              model_request_timeout=7.0))
    assert (m.max_retries, m.budget_seconds, m.timeout) == (1, 5.0, 7.0)


def test_400_is_a_model_error_without_retry(server):
    server.script = [respond_error(400, {"error": {"message": "bad thing", "type": "invalid_request_error"}})]
    with pytest.raises(ModelError, match="bad thing"):
        model(server).generate(MESSAGES, [], lambda d: None)
    assert len(server.requests) == 1


def test_connection_refused_is_retried_within_the_budget(server):
    url = server.base_url
    server.httpd.server_close()  # nothing listens on the port any more
    m = OpenAIModel("gpt-test", base_url=url, max_retries=2, backoff_base=0.001, timeout=1.0)
    with pytest.raises(ModelError, match="gave up after 3 request.*ConnectionRefused"):
        m.generate(MESSAGES, [], lambda d: None)


def test_stream_cut_after_output_is_not_retried(server):
    # The stream ends with neither finish_reason nor [DONE]: the answer is incomplete.
    server.script = [respond_stream([chunk({"content": "partial"})], done=False)]
    deltas = []
    m = model(server)
    slept = []
    m._sleep = slept.append
    with pytest.raises(TransientModelError, match="mid-answer"):
        m.generate(MESSAGES, [], deltas.append)
    assert deltas == ["partial"] and len(server.requests) == 1
    assert len(slept) == 1  # a backoff before the step is re-run, not an instant retry


def test_on_delta_exception_propagates_and_closes_connection(server):
    server.script = [respond_stream(text_stream([f"tok{i} " for i in range(200)]), delay=0.005)]

    class Cancelled(Exception):
        pass

    cancel = Cancelled("user pressed stop")
    seen = []

    def on_delta(d):
        seen.append(d)
        if len(seen) == 2:
            raise cancel

    with pytest.raises(Cancelled) as info:
        model(server).generate(MESSAGES, [], on_delta)
    assert info.value is cancel
    assert seen == ["tok0 ", "tok1 "]
    assert len(server.requests) == 1
    # The server notices the closed socket long before its 200 chunks are written.
    assert server.disconnected.wait(2.0)
