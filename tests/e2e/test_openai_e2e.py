"""A real worker drives the `openai:` model against an OpenAI-compatible server on loopback."""
from __future__ import annotations

import json

import requests

from tests.support.openai_server import Server, chunk, respond_error, respond_stream
from tests.support.processes import Procs, create_key_cli, settings_env


def _model_turn(srv):  # noqa: ANN001
    """Acts as the model: first asks for add(a, b) in fragments, then answers with the tool's result."""
    def run(h):  # noqa: ANN001
        body = srv.requests[-1]["body"]
        last = body["messages"][-1]
        if last["role"] == "tool":
            text = f"The sum is {last['content']}."
            pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
            chunks = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in pieces]
            chunks += [chunk({}, finish_reason="stop"),
                       chunk(choices=False, usage={"prompt_tokens": 30, "completion_tokens": len(pieces),
                                                   "total_tokens": 30 + len(pieces)})]
        else:
            chunks = [
                chunk({"role": "assistant", "content": None, "tool_calls": [
                    {"index": 0, "id": "call_abc", "type": "function", "function": {"name": "add", "arguments": ""}}]}),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 4'}}]}),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": '0, "b": 2}'}}]}),
                chunk({}, finish_reason="tool_calls"),
            ]
        respond_stream(chunks, delay=0.01)(h)
    return run


def test_openai_model_turn_end_to_end(procs: Procs, server: Server) -> None:
    server.script = [_model_turn(server)]
    env = settings_env(procs.settings)
    env.update(STEPRUN_AGENTS="tests.support.agents_openai", OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-test")
    procs.worker(env=env)
    procs.scheduler(env=env)
    _, url = procs.web(env=env)
    key = create_key_cli(env, "t-openai", "u-openai")
    h = {"Authorization": f"Bearer {key}"}

    sid = requests.post(f"{url}/v1/sessions", json={"agent": "gpt"}, headers=h).json()["id"]
    tid = requests.post(f"{url}/v1/sessions/{sid}/turns", json={"input": "what is 40 + 2?"}, headers=h).json()["id"]
    turn = requests.get(f"{url}/v1/turns/{tid}?wait=30", headers=h).json()
    assert turn["status"] == "completed", turn
    assert turn["output"] == "The sum is 42."

    # The provider saw OpenAI's request shape: streaming, our tool schema, then the tool result.
    first, second = server.requests[0]["body"], server.requests[1]["body"]
    assert first["model"] == "gpt-test" and first["stream"] is True
    assert first["tools"][0]["function"]["name"] == "add"
    assert first["messages"][0] == {"role": "system", "content": "Add numbers with your tool."}
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-test"
    assert second["messages"][-2]["tool_calls"][0]["id"] == "call_abc"
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_abc", "name": "add", "content": "42"}

    events = requests.get(f"{url}/v1/sessions/{sid}/events", headers=h).json()["data"]
    call = next(e for e in events if e["type"] == "tool.call")
    # Every event of a step carries its step and attempt (fenced appends, DESIGN section 5).
    assert call["data"] == {"id": "call_abc", "name": "add", "arguments": {"a": 40, "b": 2}, "step": 0, "attempt": 1}
    deltas = [e["data"]["text"] for e in events if e["type"] == "message.delta"]
    assert "".join(deltas) == "The sum is 42."
    assert turn["usage"]["input_tokens"] >= 30
    history = requests.get(f"{url}/v1/sessions/{sid}/messages", headers=h).json()["data"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(history[1]["tool_calls"][0]["function"]["arguments"]) == {"a": 40, "b": 2}


def test_provider_bad_request_fails_the_turn_with_its_message(procs: Procs, server: Server) -> None:
    server.script = [respond_error(400, {"error": {"message": "model 'gpt-test' does not exist"}})]
    env = settings_env(procs.settings)
    env.update(STEPRUN_AGENTS="tests.support.agents_openai", OPENAI_BASE_URL=server.base_url)
    procs.worker(env=env)
    procs.scheduler(env=env)
    _, url = procs.web(env=env)
    h = {"Authorization": f"Bearer {create_key_cli(env, 't-openai', 'u-openai2')}"}
    sid = requests.post(f"{url}/v1/sessions", json={"agent": "gpt"}, headers=h).json()["id"]
    tid = requests.post(f"{url}/v1/sessions/{sid}/turns", json={"input": "hi"}, headers=h).json()["id"]
    turn = requests.get(f"{url}/v1/turns/{tid}?wait=30", headers=h).json()
    assert turn["status"] == "failed"
    assert turn["error"]["code"] == "model_error" and "does not exist" in turn["error"]["message"]
