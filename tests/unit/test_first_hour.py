"""What a newcomer trips over first, checked without processes: configuration, agent loading, model calls."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import stat
import threading
import time

import pytest

from shared.agent import Agent, AgentDefinitionError, AgentRegistry, Tool, ToolContext, tool
from shared.db import private_sqlite_file
from shared.llm.base import ModelError
from shared.llm.interrupt import CallScope, call_scope
from shared.llm.openai import OpenAIModel
from shared.llm.retry import RetryBudget
from shared.logs import ContextFilter, JsonFormatter, TextFormatter
from shared.settings import Settings, SettingsError, deployment_settings

CTX = ToolContext("t", "u", "s", "turn", "key")


# --- half-configured deployments ------------------------------------------------------------------

@pytest.mark.parametrize(("env", "process", "message"), [
    ({"DATABASE_URL": "postgresql://x/y"}, "web", "DATABASE_URL is set but REDIS_URL is not"),
    ({"REDIS_URL": "redis://x"}, "worker", "REDIS_URL is set but DATABASE_URL is not"),
    ({}, "scheduler", "needs DATABASE_URL and REDIS_URL (neither is set)"),
    ({"DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x"}, "web", "STEPRUN_SECRET_KEY is not set"),
])
def test_a_half_configured_deployment_is_refused_naming_the_variable(env, process, message, capsys):
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env(env).check_deployment(process)
    with pytest.raises(SystemExit) as stop:
        deployment_settings(process, env)
    assert stop.value.code == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and f"steprun {process}" in err


def test_a_complete_deployment_passes_and_workers_need_no_secret_key():
    both = {"DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x"}
    Settings.from_env(both).check_deployment("worker")
    Settings.from_env(both).check_deployment("scheduler")
    Settings.from_env({**both, "STEPRUN_SECRET_KEY": "s" * 32}).check_deployment("web")


# --- agents, checked when they load ---------------------------------------------------------------

def test_an_async_tool_is_awaited():
    @tool
    async def later(x: int) -> int:
        """Add one, later."""
        await asyncio.sleep(0.01)
        return x + 1

    assert later.is_async and later.invoke({"x": 1}, CTX) == 2


def test_a_sync_tool_returning_a_coroutine_is_an_error_not_a_coroutine_string():
    async def inner() -> int:
        return 1

    t = tool(lambda: inner(), name="sneaky")
    with pytest.raises(TypeError, match="returned an awaitable"):
        t.invoke({}, CTX)


def test_a_bad_model_name_fails_at_load_naming_the_agent():
    with pytest.raises(AgentDefinitionError, match="agent 'x': unknown model 'gpt-4o'"):
        AgentRegistry([Agent(name="x", model="gpt-4o")])
    with pytest.raises(AgentDefinitionError, match="needs a model name"):
        AgentRegistry([Agent(name="x", model="openai:")])
    with pytest.raises(AgentDefinitionError, match="unknown option 'fast'"):
        AgentRegistry([Agent(name="x", model="scripted:fast=1")])
    AgentRegistry([Agent(name="x", model="openai:gpt-4o"), Agent(name="y", model="scripted:tps=5")])


def test_a_hand_written_tool_schema_is_checked_at_load():
    bad = Tool(fn=lambda a: a, name="t", description="d",
               parameters={"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]})
    with pytest.raises(AgentDefinitionError, match="tool 't': parameters.required"):
        AgentRegistry([Agent(name="x", tools=[bad])])
    flat = Tool(fn=lambda: 1, name="t", description="d", parameters={"type": "string"})
    with pytest.raises(AgentDefinitionError, match='"type": "object"'):
        AgentRegistry([Agent(name="x", tools=[flat])])


def test_a_missing_agents_module_is_one_line_naming_it_and_the_search_path():
    with pytest.raises(AgentDefinitionError) as err:
        AgentRegistry.from_module("nosuchapp.agents")
    text = str(err.value)
    assert "\n" not in text and "STEPRUN_AGENTS=nosuchapp.agents" in text and "'nosuchapp'" in text
    assert "searched:" in text


# --- the retry budget -----------------------------------------------------------------------------

def test_retry_budget_counts_attempts_and_seconds_with_jitter():
    now = [0.0]
    b = RetryBudget(5, 10.0, base=1.0, clock=lambda: now[0], rand=lambda: 0.5)
    b.attempt()
    assert b.next_delay() == 0.5            # half of the first window (1 s)
    b.attempt()
    assert b.next_delay() == 1.0            # half of 2 s
    assert b.next_delay(retry_after=3.0) == pytest.approx(3.0 + 0.5 * 0.4)  # Retry-After is a floor
    now[0] = 9.8
    assert b.next_delay() is None           # the wait would end past the 10 s budget
    b2 = RetryBudget(2, 100.0, clock=lambda: 0.0)
    b2.attempt()
    b2.attempt()
    assert b2.next_delay() is None          # attempts spent


# --- interrupting a blocked model call from another thread (embedded mode) ------------------------

def test_aborting_the_call_scope_cuts_a_model_call_that_never_answers():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    model = OpenAIModel("gpt-test", base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1", timeout=60.0)
    scope = CallScope()

    class Stopped(Exception):
        pass

    outcome: list[BaseException] = []

    def call() -> None:
        with call_scope(scope):
            try:
                model.generate([{"role": "user", "content": "hi"}], [], lambda d: None)
            except BaseException as exc:  # noqa: BLE001 - what the call raised is the subject
                outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)
    assert caller.is_alive()  # blocked on a server that never answers (its timeout is 60 s)
    started = time.monotonic()
    scope.abort(Stopped)
    caller.join(10)
    assert not caller.is_alive() and isinstance(outcome[0], Stopped)  # the stop, not a retry or ModelError
    assert time.monotonic() - started < 5
    listener.close()
    for s in held:
        s.close()


def test_outside_a_step_a_model_call_is_not_interruptible_but_still_bounded():
    model = OpenAIModel("gpt-test", base_url="http://127.0.0.1:9/v1", max_retries=1, backoff_base=0.001)
    with pytest.raises(ModelError, match="gave up after 2 request"):
        model.generate([{"role": "user", "content": "hi"}], [], lambda d: None)


# --- logs and files -------------------------------------------------------------------------------

def test_colour_codes_never_reach_a_log_line():
    record = logging.LogRecord("werkzeug", logging.INFO, __file__, 1,
                               '127.0.0.1 "GET / HTTP/1.1" \x1b[32m200\x1b[0m -', None, None)
    ContextFilter().filter(record)
    text = TextFormatter().format(record)
    line = json.loads(JsonFormatter().format(record))["message"]
    for out in (text, line):
        assert "\x1b" not in out and '"GET / HTTP/1.1" 200 -' in out


def test_the_sqlite_file_and_its_folder_are_private(tmp_path):
    data = tmp_path / "data"
    db = data / "steprun.db"
    old = os.umask(0o022)
    try:
        private_sqlite_file(str(data), str(db))
    finally:
        os.umask(old)
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    db.chmod(0o644)  # a file made world-readable before: tightened on the next start
    private_sqlite_file(str(data), str(db))
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_chat_says_text_restarts_only_when_text_of_that_step_was_printed():
    import io

    from steprun.chat import Chat

    out, err = io.StringIO(), io.StringIO()
    chat = Chat("http://127.0.0.1:9", "k", out=out, err=err, inp=io.StringIO())
    retry = {"turn_id": "t", "type": "step.retrying", "data": {"step": 0}}
    chat._show("t", retry)  # a 429 before anything streamed: nothing to take back
    assert err.getvalue() == ""
    chat._show("t", {"turn_id": "t", "type": "message.delta", "data": {"step": 0, "text": "Hel"}})
    chat._show("t", retry)
    assert "its text restarts" in err.getvalue() and out.getvalue() == "Hel"


def test_a_second_ctrl_c_quits_the_chat_even_while_the_first_ones_cancel_is_being_sent():
    import io

    from steprun.chat import Chat

    err = io.StringIO()
    chat = Chat("http://127.0.0.1:9", "k", out=io.StringIO(), err=err, inp=io.StringIO())
    sent: list[dict] = []

    def next_frame(timeout: float = 0.2) -> None:
        raise KeyboardInterrupt  # the first Ctrl-C, while the chat waits for the stream

    def request(frame: dict) -> str:
        sent.append(frame)
        raise KeyboardInterrupt  # the second, while the cancel goes out

    chat._next, chat.request = next_frame, request  # type: ignore[method-assign]
    try:
        status = chat._stream("t1")
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C escaped the stream: the chat ended without saying [quit]")
    assert status == "quit"
    assert sent == [{"type": "cancel", "turn_id": "t1"}]
    assert err.getvalue().endswith("[cancelling the turn; Ctrl-C again to quit]\n[quit]\n")
