"""The official `openai` client, unmodified, against steprun's Responses and Conversations API (DESIGN 10.1).

Two deployment shapes: the Procfile processes (two web processes, a worker, the
scheduler) on Postgres and Redis, and `steprun dev`. "The other process" is the
second web process in production, and the same one in the embedded mode.
"""
from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from openai import OpenAI

from shared.settings import Settings
from tests.support.processes import BIN, ROOT, Proc, Procs, create_key_cli, free_port, settings_env, wait_http

AGENTS = {"STEPRUN_AGENTS": "tests.support.agents_responses", "STEPRUN_RATE_LIMIT_PER_MINUTE": "0",
          "STEPRUN_RATE_LIMIT_PER_KEY": "0"}


@dataclass
class Deployment:
    mode: str
    urls: tuple[str, str]  # two API processes (the same one twice in the embedded mode)
    env: dict[str, str]
    procs: Procs
    cwd: Path
    worker: Proc | None = None

    def key(self) -> str:
        return create_key_cli(self.env, f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}", cwd=self.cwd)

    def client(self, key: str, which: int = 0) -> OpenAI:
        return OpenAI(base_url=f"{self.urls[which]}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module", params=["production", "embedded"])
def dep(request: pytest.FixtureRequest, settings: Settings,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    procs = Procs(settings, tmp_path_factory.mktemp(f"openai-{request.param}"))
    try:
        if request.param == "production":
            env = {**settings_env(settings), **AGENTS}
            worker = procs.worker(env=env)
            procs.scheduler(env=env)
            _, one = procs.web(env=env)
            _, two = procs.web(env=env)
            yield Deployment("production", (one, two), env, procs, ROOT, worker)
        else:
            workdir = tmp_path_factory.mktemp("embedded")
            env = {k: v for k, v in settings_env(settings).items() if k not in ("DATABASE_URL", "REDIS_URL")}
            env.update(AGENTS, STEPRUN_DATA_DIR=str(workdir / ".steprun"), _STEPRUN_CWD=str(workdir))
            port = free_port()
            proc = procs.start("dev", [str(BIN / "steprun"), "dev", "--port", str(port)], env=env, cwd=workdir)
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/healthz", proc)
            yield Deployment("embedded", (url, url), env, procs, workdir)
    finally:
        procs.stop_all()


@pytest.fixture
def key(dep: Deployment) -> str:
    return dep.key()


def deltas(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def wait_done(client: OpenAI, response_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    response = client.responses.retrieve(response_id)
    while response.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.1)
        response = client.responses.retrieve(response_id)
    return response


def test_sync_create_runs_the_tool_on_the_server(dep: Deployment, key: str) -> None:
    response = dep.client(key).responses.create(model="math", input="add 2 and 3")
    assert response.status == "completed"
    assert response.output_text == "The result of add is 5."
    call, message = response.output
    assert call.type == "mcp_call" and call.server_label == "steprun" and call.name == "add"
    assert call.arguments == '{"a": 2, "b": 3}' and call.output == "5" and call.error is None
    assert message.type == "message"
    assert response.usage is not None and response.usage.total_tokens > 0
    assert response.model == "math" and response.conversation is not None


def test_background_create_polled_from_the_other_process(dep: Deployment, key: str) -> None:
    created = dep.client(key, 0).responses.create(model="echo", input="poll me", background=True)
    assert created.status in ("queued", "in_progress") and created.background
    seen = {created.status}
    other = dep.client(key, 1)
    deadline = time.monotonic() + 60
    response = other.responses.retrieve(created.id)
    while response.status in ("queued", "in_progress") and time.monotonic() < deadline:
        seen.add(response.status)
        time.sleep(0.05)
        response = other.responses.retrieve(created.id)
    assert response.status == "completed" and "in_progress" in seen
    assert response.output_text.startswith("You said: poll me")


def test_stream_dropped_then_resumed_on_the_other_process(dep: Deployment, key: str) -> None:
    first = dep.client(key, 0).responses.create(model="long", input="resume me", stream=True)
    got: list[Any] = []
    for event in first:
        got.append(event)
        if sum(e.type == "response.output_text.delta" for e in got) >= 3:
            break
    first.close()  # the connection drops after a few deltas
    response_id = got[0].response.id
    last = got[-1].sequence_number
    rest = list(dep.client(key, 1).responses.retrieve(response_id, stream=True, starting_after=last))
    events = got + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))  # no gap, nothing twice
    assert events[-1].type == "response.completed"
    final = dep.client(key, 1).responses.retrieve(response_id)
    assert deltas(events) == final.output_text == events[-1].response.output_text
    assert len(final.output_text.split()) > 400
    # A replay numbers the events alike.
    replay = list(dep.client(key, 0).responses.retrieve(response_id, stream=True))
    assert [(e.sequence_number, e.type) for e in replay] == [(e.sequence_number, e.type) for e in events]


def test_stream_helper_by_response_id(dep: Deployment, key: str) -> None:
    created = dep.client(key).responses.create(model="echo", input="helper", background=True)
    with dep.client(key, 1).responses.stream(response_id=created.id, starting_after=2) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert events[0].sequence_number == 3
    assert final.status == "completed" and final.output_text.startswith("You said: helper")
    assert deltas(events) == final.output_text


def test_cancel_twice_from_both_processes_keeps_the_partial_text(dep: Deployment, key: str) -> None:
    one, two = dep.client(key, 0), dep.client(key, 1)
    created = one.responses.create(model="long", input="cancel me", background=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the step has streamed something (the native events say)
        events = requests.get(f"{dep.urls[0]}/v1/sessions/{_session(dep, key, created)}/events",
                              headers={"Authorization": f"Bearer {key}"}, timeout=10).json()["data"]
        if any(e["type"] == "message.delta" for e in events):
            break
        time.sleep(0.05)
    cancelled = one.responses.cancel(created.id)
    again = two.responses.cancel(created.id)
    assert cancelled.status == again.status == "cancelled"
    assert again.output_text == cancelled.output_text
    assert 0 < len(again.output_text.split()) < 400 and again.output_text.startswith("You said: cancel me")
    streamed = list(two.responses.retrieve(created.id, stream=True))
    assert deltas(streamed) == again.output_text and streamed[-1].response.status == "cancelled"


def _session(dep: Deployment, key: str, response: Any) -> str:
    return "ses_" + response.conversation.id.removeprefix("conv_")


def test_conversation_of_several_responses_read_back(dep: Deployment, key: str) -> None:
    client = dep.client(key)
    conv = client.conversations.create(metadata={"topic": "sums"})
    first = client.responses.create(model="math", input="add 1 and 2", conversation=conv.id)
    second = client.responses.create(model="math", input="add 3 and 4", conversation={"id": conv.id})
    third = dep.client(key, 1).responses.create(model="math", input="say hi", previous_response_id=second.id)
    assert third.conversation.id == conv.id == first.conversation.id
    items = dep.client(key, 1).conversations.items.list(conv.id, order="asc")
    kinds = [(i.type, getattr(i, "role", None)) for i in items.data]
    assert kinds == [("message", "user"), ("mcp_call", None), ("message", "assistant")] * 2 + [
        ("message", "user"), ("message", "assistant")]
    texts = [i.content[0].text for i in items.data if i.type == "message"]
    assert texts == ["add 1 and 2", first.output_text, "add 3 and 4", second.output_text, "say hi",
                     third.output_text]
    assert client.conversations.retrieve(conv.id).metadata == {"topic": "sums"}
    assert client.conversations.update(conv.id, metadata={"topic": "more"}).metadata == {"topic": "more"}
    with pytest.raises(openai.BadRequestError) as exc:  # a conversation keeps the agent it started with
        client.responses.create(model="echo", input="x", conversation=conv.id)
    assert exc.value.body["param"] == "model"
    page = client.conversations.items.list(conv.id, limit=2)  # newest first by default
    assert [i.id for i in page.data] == [i.id for i in items.data][::-1][:2] and page.has_more
    assert client.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)


@pytest.mark.parametrize("approve", [True, False])
def test_approval_through_mcp_approval_response(dep: Deployment, key: str, approve: bool) -> None:
    client = dep.client(key)
    asked = client.responses.create(model="bank", input="transfer to bob 5")
    assert asked.status == "completed"
    (request,) = [o for o in asked.output if o.type == "mcp_approval_request"]
    assert request.name == "transfer" and request.server_label == "steprun"
    answered = dep.client(key, 1).responses.create(
        model="bank", previous_response_id=asked.id,
        input=[{"type": "mcp_approval_response", "approval_request_id": request.id, "approve": approve}])
    assert answered.status == "completed" and answered.id != asked.id
    (call,) = [o for o in answered.output if o.type == "mcp_call"]
    if approve:
        assert call.output == "sent 5.00 to to bob 5" and call.error is None
        assert "sent 5.00" in answered.output_text
    else:
        assert call.output is None and call.error == "declined by the user"
        assert "declined" in answered.output_text
    assert answered.previous_response_id == asked.id
    inputs = client.responses.input_items.list(answered.id)
    assert [(i.type, i.approve) for i in inputs.data] == [("mcp_approval_response", approve)]
    # The same request cannot be answered twice.
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="bank", previous_response_id=asked.id, input=[
            {"type": "mcp_approval_response", "approval_request_id": request.id, "approve": approve}])


def test_errors_have_openai_shape(dep: Deployment, key: str) -> None:
    client = dep.client(key)
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="no-such-agent", input="hi")
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    assert missing.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="math", input=[{"type": "input_image", "image_url": "http://x"}])
    assert bad.value.param == "input[0]" and "input_image" in bad.value.message
    mine = client.responses.create(model="math", input="add 1 and 1")
    conv = client.conversations.create()
    other = dep.client(dep.key(), 1)
    for call in (lambda: other.responses.retrieve(mine.id), lambda: other.responses.cancel(mine.id),
                 lambda: other.conversations.retrieve(conv.id), lambda: other.conversations.items.list(conv.id),
                 lambda: other.responses.create(model="math", input="x", previous_response_id=mine.id)):
        with pytest.raises(openai.NotFoundError) as hidden:
            call()
        assert set(hidden.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        dep.client("sr_not_a_key").responses.retrieve(mine.id)


@pytest.mark.parametrize("dep", ["production"], indirect=True)  # embedded: steps run in the API process
def test_worker_killed_mid_stream_text_still_exact(dep: Deployment, key: str) -> None:
    assert dep.worker is not None
    stream = dep.client(key).responses.create(model="long", input="survive", stream=True)
    events = [next(stream)]
    session = _session(dep, key, events[0].response)
    auth = {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the step streams (natively) before the worker dies
        native = requests.get(f"{dep.urls[1]}/v1/sessions/{session}/events", headers=auth, timeout=10).json()
        if sum(e["type"] == "message.delta" for e in native["data"]) >= 3:
            break
        time.sleep(0.05)
    dep.worker.kill(signal.SIGKILL)
    dep.worker = dep.procs.worker(env=dep.env)
    events.extend(stream)
    final = dep.client(key, 1).responses.retrieve(events[0].response.id)
    assert final.status == "completed"
    assert deltas(events) == final.output_text == events[-1].response.output_text
    assert final.output_text.count("You said: survive") == 1
    assert [e.sequence_number for e in events] == list(range(len(events)))
    native = requests.get(f"{dep.urls[1]}/v1/sessions/{session}/events", headers=auth, timeout=10).json()
    assert any(e["type"] == "step.retrying" for e in native["data"])  # it did die and retry


def test_openapi_describes_the_routes(dep: Deployment) -> None:
    paths = requests.get(f"{dep.urls[0]}/openapi.json", timeout=10).json()["paths"]
    for path in ("/v1/responses", "/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel",
                 "/v1/responses/{response_id}/input_items", "/v1/conversations",
                 "/v1/conversations/{conversation_id}", "/v1/conversations/{conversation_id}/items"):
        assert path in paths


def test_openai_agents_sdk_uses_a_steprun_agent_as_its_model(dep: Deployment, key: str) -> None:
    """The Agents SDK (a second outside client) runs a turn with a steprun agent as its Responses model."""
    import asyncio

    from agents import Agent, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)  # its traces would go to OpenAI's servers
    client = openai.AsyncOpenAI(base_url=f"{dep.urls[0]}/v1", api_key=key, max_retries=0, timeout=60)
    agent = Agent(name="math", instructions="You add numbers.",
                  model=OpenAIResponsesModel(model="math", openai_client=client))

    async def run() -> tuple[Any, Any, str]:
        result = await Runner.run(agent, "add 2 and 3")
        streamed = Runner.run_streamed(agent, "add 4 and 5", previous_response_id=result.last_response_id)
        text = ""
        async for event in streamed.stream_events():
            if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
                text += event.data.delta
        return result, streamed, text

    result, streamed, text = asyncio.run(run())
    assert result.final_output == "The result of add is 5."
    assert [type(i).__name__ for i in result.new_items] == ["ToolCallItem", "MessageOutputItem"]
    assert streamed.final_output == text == "The result of add is 9."
