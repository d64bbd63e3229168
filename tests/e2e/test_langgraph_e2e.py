"""LangGraph clients, unmodified (langgraph-sdk sync and async, langgraph's RemoteGraph), against /langgraph.

Both deployment shapes (Procfile processes on Postgres+Redis, and `steprun dev`)
through the ``stack`` fixture; the SIGKILL test runs its own production
deployment, whose worker it kills. The clients' versions are pinned in the
``dev`` extra.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import requests
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage, convert_to_messages
from langgraph.pregel.remote import RemoteGraph
from langgraph_sdk import get_client, get_sync_client
from langgraph_sdk.errors import AuthenticationError, ConflictError, NotFoundError

from tests.support.processes import Procs, Stack
from tests.support.recovery_support import deploy
from tests.support.relay import CuttingRelay


def lg(url: str) -> str:
    return f"{url}/langgraph"


def user(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def ai_text(parts: list[Any]) -> str:
    """What a client shows from the messages-tuple stream: the AI chunks' text, concatenated."""
    return "".join(p.data[0]["content"] for p in parts
                   if p.event == "messages" and p.data[0]["type"] == "AIMessageChunk")


def run_answer(state: dict[str, Any], run_id: str) -> str:
    """The run's answer as the history keeps it: its AI messages' text, in order."""
    return "".join(m["content"] for m in state["values"]["messages"] if m["type"] == "ai"
                   and m["id"].startswith(run_id))


def assert_each_frame_once(parts: list[Any]) -> None:
    ids = [p.id for p in parts if p.event]
    assert all(ids) and len(ids) == len(set(ids)), ids


def test_wait_with_a_tool_call(stack: Stack) -> None:
    client = get_sync_client(url=lg(stack.url), api_key=stack.key)
    thread = client.threads.create(metadata={"app": "wait-test"})
    assert thread["status"] == "idle"
    tid = thread["thread_id"]
    out = client.runs.wait(tid, "math", input=user("add 2 and 3"))

    messages = convert_to_messages(out["messages"])  # LangChain parses the state as it is
    assert [type(m) for m in messages] == [HumanMessage, AIMessage, ToolMessage, AIMessage]
    call = messages[1].tool_calls[0]
    assert (call["name"], call["args"]) == ("add", {"a": 2, "b": 3})
    assert messages[2].content == "5" and messages[2].tool_call_id == call["id"]
    assert messages[3].content == "The result of add is 5."

    assert client.threads.get_state(tid)["values"] == out
    history = client.threads.get_history(tid)
    assert [len(h["values"]["messages"]) for h in history] == [4, 3]  # one state per committed step
    assert history[0]["parent_checkpoint"]["checkpoint_id"] == history[1]["checkpoint"]["checkpoint_id"]
    got = client.threads.get(tid)
    assert got["status"] == "idle" and got["metadata"] == {"app": "wait-test", "graph_id": "math",
                                                            "assistant_id": "math"}
    [run] = client.runs.list(tid)
    assert run["status"] == "success" and run["assistant_id"] == "math"
    assert tid in [t["thread_id"] for t in client.threads.search(metadata={"app": "wait-test"})]
    assert [a["graph_id"] for a in client.assistants.search(graph_id="math")] == ["math"]

    # A thread's agent is bound by its first run.
    with pytest.raises(Exception, match="runs assistant 'math'"):
        client.runs.wait(tid, "echo", input=user("hi"))


def test_stream_cut_mid_frame_is_resumed_by_the_sdk_exactly(stack: Stack) -> None:
    """The async client's own reconnect (Location + Last-Event-ID) resumes a stream a relay cuts mid-frame."""
    relay = CuttingRelay(urlsplit(stack.url).port or 80, cut_after=3)

    async def scenario() -> tuple[list[Any], dict[str, Any], str]:
        client = get_client(url=lg(relay.url), api_key=stack.key)
        thread = await client.threads.create()
        parts = [p async for p in client.runs.stream(
            thread["thread_id"], "echo", input=user("tell me a long story"),
            stream_mode=["messages-tuple", "values"])]
        return parts, await client.threads.get_state(thread["thread_id"]), thread["thread_id"]

    try:
        parts, state, tid = asyncio.run(scenario())
    finally:
        relay.close()
    assert relay.cuts == 1
    reconnects = [h for h in relay.heads if h.startswith(b"GET ") and b"/runs/" in h and b"/stream" in h]
    assert reconnects and b"last-event-id:" in reconnects[0].lower(), relay.heads
    assert f"/langgraph/threads/{tid}/runs/".encode() in reconnects[0]

    assert parts[0].event == "metadata" and parts[-1].event == "end"
    assert_each_frame_once(parts)
    run_id = parts[0].data["run_id"]
    answer = run_answer(state, run_id)
    assert answer.startswith("You said: tell me a long story") and len(answer.split()) > 60
    assert ai_text(parts) == answer  # every token once, none missing, none stale
    values = [p.data for p in parts if p.event == "values"]
    assert values[0]["messages"][-1]["content"] == "tell me a long story"  # the input, before any step
    assert values[-1] == state["values"]


def test_background_run_joined_from_the_other_api_process(stack: Stack) -> None:
    other = stack.procs.web(env=stack.env)[1] if stack.mode == "production" else stack.url
    a = get_sync_client(url=lg(stack.url), api_key=stack.key)
    b = get_sync_client(url=lg(other), api_key=stack.key)
    tid = a.threads.create()["thread_id"]
    run = a.runs.create(tid, "echo", input=user("in the background"))
    assert run["status"] in ("pending", "running")
    modes = ["messages-tuple", "values", "updates"]
    parts = list(b.runs.join_stream(tid, run["run_id"], stream_mode=modes))  # from the run's start
    joined = b.runs.join(tid, run["run_id"])
    assert b.runs.get(tid, run["run_id"])["status"] == "success"
    assert ai_text(parts) == joined["messages"][-1]["content"]
    assert [p.data for p in parts if p.event == "values"][-1] == joined
    assert_each_frame_once(parts)
    # Joining again after frame k, on either process, gives exactly the frames after it.
    k = len(parts) // 2
    for client in (a, b):
        tail = list(client.runs.join_stream(tid, run["run_id"], stream_mode=modes, last_event_id=parts[k].id))
        assert [(p.id, p.event, p.data) for p in tail] == [(p.id, p.event, p.data) for p in parts[k + 1:]]


def test_multitask_strategies(stack: Stack) -> None:
    client = get_sync_client(url=lg(stack.url), api_key=stack.key)
    tid = client.threads.create()["thread_id"]
    first = client.runs.create(tid, "echo", input=user("first"))
    assert client.threads.get(tid)["status"] == "busy"
    with pytest.raises(ConflictError):
        client.runs.create(tid, "echo", input=user("second"), multitask_strategy="reject")
    queued = client.runs.create(tid, "echo", input=user("third"), multitask_strategy="enqueue")
    last = client.runs.create(tid, "echo", input=user("fourth"), multitask_strategy="interrupt")
    final = client.runs.join(tid, last["run_id"])
    assert final["messages"][-1]["content"].startswith("You said: fourth")
    statuses = {r["run_id"]: r["status"] for r in client.runs.list(tid)}
    assert statuses[first["run_id"]] == statuses[queued["run_id"]] == "interrupted"
    assert statuses[last["run_id"]] == "success" and len(statuses) == 3  # the rejected one never existed
    assert client.threads.get(tid)["status"] == "idle"


def test_rollback_deletes_the_active_run_as_if_it_never_ran(stack: Stack) -> None:
    """multitask_strategy=rollback: the busy run (paused with committed steps, or mid-stream) is gone."""
    client = get_sync_client(url=lg(stack.url), api_key=stack.key)

    def ids_in_state(tid: str) -> set[str]:
        return {m["id"].split("-")[0] for m in client.threads.get_state(tid)["values"]["messages"]}

    # A paused run: its first step (the input, the tool call) and its checkpoint are committed.
    tid = client.threads.create()["thread_id"]
    before = client.runs.wait(tid, "bank", input=user("add 2 and 3"))
    paused = client.runs.wait(tid, "bank", input=user("transfer 25 to bob"))
    assert paused["__interrupt__"] and len(client.threads.get_history(tid)) == 3
    [old, kept] = client.runs.list(tid)
    out = client.runs.wait(tid, "bank", input=user("add 4 and 5"), multitask_strategy="rollback")
    assert [m["content"] for m in out["messages"]] == [m["content"] for m in before["messages"]] + [
        "add 4 and 5", "", "9", "The result of add is 9."]
    with pytest.raises(NotFoundError):
        client.runs.get(tid, old["run_id"])
    runs = client.runs.list(tid)
    assert [r["run_id"] for r in runs][1:] == [kept["run_id"]] and runs[0]["status"] == "success"
    assert old["run_id"] not in ids_in_state(tid)
    assert len(client.threads.get_history(tid)) == 4  # its checkpoint went with it: two steps per run
    assert client.threads.get(tid)["status"] == "idle"
    with pytest.raises(httpx.HTTPStatusError) as caught:  # nothing is paused any more
        client.runs.wait(tid, "bank", command={"resume": {"approve": True}})
    assert caught.value.response.status_code == 409

    # A run whose step is streaming when it is rolled back never commits, not even later.
    tid = client.threads.create()["thread_id"]
    client.runs.wait(tid, "echo", input=user("hello"))
    long_input = " ".join(["word"] * 200)  # echoed back at 100 tokens/s: seconds of streaming
    started = time.monotonic()
    stream = client.runs.stream(tid, "echo", input=user(long_input), stream_mode="messages-tuple")
    running_id = None
    for part in stream:  # leave once its tokens flow (the run goes on: on_disconnect=continue)
        if part.event == "metadata":
            running_id = part.data["run_id"]
        if part.event == "messages" and part.data[0]["content"]:
            break
    stream.close()
    assert running_id is not None and client.runs.get(tid, running_id)["status"] == "running"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # others following the run see it go
        joined = pool.submit(get_sync_client(url=lg(stack.url), api_key=stack.key).runs.join, tid, running_id)
        followed = pool.submit(lambda: list(get_sync_client(url=lg(stack.url), api_key=stack.key)
                                            .runs.join_stream(tid, running_id, stream_mode="values")))
        time.sleep(0.3)
        out = client.runs.wait(tid, "echo", input=user("instead"), multitask_strategy="rollback")
        assert joined.result(timeout=30)["__error__"]["error"] == "rolled_back"
        assert followed.result(timeout=30)[-1].event == "end"
    assert [m["content"].split(" ")[:3] for m in out["messages"]][2:] == [["instead"], ["You", "said:", "instead"]]
    with pytest.raises(NotFoundError):
        client.runs.get(tid, running_id)
    # Past the time the rolled-back step would have taken to finish, it has still written nothing.
    time.sleep(max(0.0, started + 5.0 - time.monotonic()))
    assert running_id not in ids_in_state(tid) and len(client.runs.list(tid)) == 2
    assert [len(h["values"]["messages"]) for h in client.threads.get_history(tid)] == [4, 2]

    # cancel(action="rollback") deletes the run it names.
    run = client.runs.create(tid, "echo", input=user(long_input))
    client.runs.cancel(tid, run["run_id"], action="rollback")
    with pytest.raises(NotFoundError):
        client.runs.get(tid, run["run_id"])
    assert client.threads.get(tid)["status"] == "idle" and len(client.runs.list(tid)) == 2


def test_approval_interrupt_resumed_by_command(stack: Stack) -> None:
    client = get_sync_client(url=lg(stack.url), api_key=stack.key)
    tid = client.threads.create()["thread_id"]
    paused = client.runs.wait(tid, "bank", input=user("transfer 25 to bob"))
    [interrupt] = paused["__interrupt__"]
    assert interrupt["value"]["reason"] == "approval"
    assert interrupt["value"]["tool_calls"][0]["name"] == "transfer"
    assert client.threads.get(tid)["status"] == "interrupted"
    state = client.threads.get_state(tid)
    assert state["next"] == ["tools"] and state["tasks"][0]["interrupts"] == [interrupt]
    [run] = client.runs.list(tid)
    assert run["status"] == "interrupted"

    parts = list(client.runs.stream(tid, "bank", command={"resume": {"approve": True}},
                                    stream_mode=["updates", "messages-tuple", "values"]))
    assert parts[0].event == "metadata" and parts[0].data["run_id"] == run["run_id"]  # the same run goes on
    assert parts[-1].event == "end"
    assert_each_frame_once(parts)
    tools = [p.data["tools"] for p in parts if p.event == "updates" and "tools" in p.data]
    assert tools[0]["messages"][0]["content"].startswith("sent 25.00")
    answer = client.threads.get_state(tid)["values"]["messages"][-1]["content"]
    assert answer.startswith("The result of transfer is sent 25.00") and ai_text(parts) == answer
    assert client.runs.get(tid, run["run_id"])["status"] == "success"

    # ask_user pauses with a question; a plain string resumes it as the answer.
    asked = client.runs.wait(tid, "bank", input=user("ask_user which account"))
    assert asked["__interrupt__"][0]["value"]["reason"] == "question"
    done = client.runs.wait(tid, "bank", command={"resume": "savings"})
    assert done["messages"][-1]["content"] == "The result of ask_user is savings."
    with pytest.raises(httpx.HTTPStatusError) as caught:  # nothing is paused any more (wait raises untyped)
        client.runs.wait(tid, "bank", command={"resume": {"approve": True}})
    assert caught.value.response.status_code == 409


def test_another_users_thread_is_not_found(stack: Stack) -> None:
    mine = get_sync_client(url=lg(stack.url), api_key=stack.key)
    theirs = get_sync_client(url=lg(stack.url), api_key=stack.new_user_key())
    thread_id = str(uuid.uuid4())
    mine.threads.create(thread_id=thread_id)
    run = mine.runs.create(thread_id, "echo", input=user("private"))
    for call in (lambda: theirs.threads.get(thread_id), lambda: theirs.threads.get_state(thread_id),
                 lambda: theirs.threads.get_history(thread_id), lambda: theirs.runs.list(thread_id),
                 lambda: theirs.runs.get(thread_id, run["run_id"]), lambda: theirs.runs.join(thread_id, run["run_id"]),
                 lambda: list(theirs.runs.join_stream(thread_id, run["run_id"])),
                 lambda: theirs.runs.cancel(thread_id, run["run_id"]),
                 lambda: theirs.runs.create(thread_id, "echo", input=user("mine now")),
                 lambda: theirs.threads.update(thread_id, metadata={"x": 1}),
                 lambda: theirs.threads.delete(thread_id)):
        with pytest.raises(httpx.HTTPStatusError) as caught:  # NotFoundError, or untyped from join
            call()
        assert caught.value.response.status_code == 404
        assert caught.value.response.json() == {"detail": f"no thread {thread_id!r}"}
    assert thread_id not in [t["thread_id"] for t in theirs.threads.search()]
    with pytest.raises(ConflictError):  # the id is taken; nothing of the thread is shown
        theirs.threads.create(thread_id=thread_id)
    with pytest.raises(AuthenticationError):
        list(get_sync_client(url=lg(stack.url), api_key=None).threads.search())
    assert mine.runs.join(thread_id, run["run_id"])["messages"][-1]["content"].startswith("You said: private")


def test_remote_graph(stack: Stack) -> None:
    graph = RemoteGraph("math", url=lg(stack.url), api_key=stack.key)
    out = graph.invoke(user("add 20 and 22"))  # stateless: POST /runs/stream
    assert out["messages"][-1]["content"] == "The result of add is 42."
    tokens = [chunk["content"] for chunk, meta in graph.stream(user("add 1 and 1"), stream_mode="messages")
              if chunk["type"] == "AIMessageChunk"]
    assert "".join(tokens) == "The result of add is 2."
    config = {"configurable": {"thread_id": str(uuid.uuid4())}}
    graph.invoke(user("multiply 6 and 7"), config)  # creates the thread (if_not_exists=create)
    snapshot = graph.get_state(config)
    assert snapshot.values["messages"][-1]["content"] == "The result of multiply is 42.0."
    assert snapshot.next == () and snapshot.tasks == ()
    history = list(graph.get_state_history(config))
    assert len(history) == 2
    assert graph.get_state(history[1].config).values["messages"][-1]["type"] == "tool"  # the state after step 0


def test_a_worker_sigkilled_mid_run_the_client_gets_the_exact_answer(procs: Procs) -> None:
    d = deploy(procs, procs.settings, STEPRUN_RATE_LIMIT_PER_MINUTE="0", STEPRUN_RATE_LIMIT_PER_KEY="0")
    client = get_sync_client(url=lg(d.url), api_key=d.key)
    tid = client.threads.create()["thread_id"]
    parts, killed = [], False
    for part in client.runs.stream(tid, "streamer", input=user("add 1 and 41"),
                                   stream_mode=["messages-tuple", "values", "updates"]):
        parts.append(part)
        if part.event == "messages" and not killed:
            d.workers.pop().kill()  # SIGKILL to the worker's process group, mid-stream of step 0
            d.worker()
            killed = True
    assert killed and parts[-1].event == "end"
    assert_each_frame_once(parts)
    answer = run_answer(client.threads.get_state(tid), parts[0].data["run_id"])
    assert "The result of add is 42." in answer
    assert ai_text(parts) == answer
    agent_updates = [p for p in parts if p.event == "updates" and "agent" in p.data]
    assert len(agent_updates) == 2  # each step once, though step 0 ran twice
    events = requests.get(f"{d.url}/v1/sessions/{tid}/events", headers={"Authorization": f"Bearer {d.key}"},
                          timeout=10).json()["data"]
    assert any(e["type"] == "step.retrying" and e["data"]["step"] == 0 for e in events)  # the kill did land mid-step
