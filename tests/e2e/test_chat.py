"""`steprun chat` driven in a pseudo-terminal (pexpect), as a person types: reconnects, Ctrl-C, --session."""
from __future__ import annotations

import secrets
import shlex
import signal
import time
from pathlib import Path

import pexpect
import requests

from shared.settings import Settings
from tests.e2e.test_first_hour import dev_env, dev_key, start_dev
from tests.support.processes import BIN, Procs, create_key_cli, free_port, settings_env, wait_http

AGENTS = "tests.support.agents_chat"


def spawn(argv: list[str], env: dict[str, str], cwd: Path) -> pexpect.spawn:
    child = pexpect.spawn(argv[0], argv[1:], env=env, cwd=str(cwd), encoding="utf-8", timeout=40,
                          dimensions=(40, 200))
    return child


def banner_command(dev_log: str) -> list[str]:
    line = next(line for line in dev_log.splitlines() if line.startswith("chat: "))
    return shlex.split(line[len("chat: "):])


def session_of(child: pexpect.spawn) -> str:
    child.expect(r"session (\S+) with agent (\S+);")
    return child.match.group(1)


def user_inputs(url: str, h: dict[str, str], sid: str) -> list[str]:
    messages = requests.get(f"{url}/v1/sessions/{sid}/messages?limit=100", headers=h).json()["data"]
    return [m["content"] for m in messages if m["role"] == "user"]


def test_banner_command_ctrl_c_cancels_then_quits_and_line_editing(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    dev = start_dev(procs, tmp_path, port, STEPRUN_AGENTS=AGENTS)
    argv = banner_command(dev.log())  # pasted as printed: no --key (found in .steprun/), full path
    assert "--key" not in argv and argv[1] == "chat"
    chat = spawn(argv, dev_env(), tmp_path)
    sid = session_of(chat)
    chat.expect_exact("you> ")
    chat.send("abc\x1b[D\x1b[DX\r")  # two left arrows, then X: line editing, no escape codes sent
    chat.expect_exact("You said: aXbc")
    chat.sendintr()  # the first Ctrl-C cancels the running turn
    chat.expect_exact("[cancelling the turn; Ctrl-C again to quit]")
    chat.expect_exact("[cancelled")
    chat.expect_exact("you> ")
    chat.sendline("again")
    chat.expect_exact("You said: again")
    chat.sendintr()
    chat.expect_exact("cancelling")
    chat.sendintr()  # the second one quits
    chat.expect_exact("[quit]")
    chat.expect(pexpect.EOF)
    h = dev_key(tmp_path)
    # The chat quit without waiting: the second turn's cancel commits its step (with the input) shortly after.
    deadline = time.monotonic() + 15
    while user_inputs(url, h, sid) != ["aXbc", "again"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert user_inputs(url, h, sid) == ["aXbc", "again"]
    # The first turn was cancelled, not left running when the chat moved on.
    session = requests.get(f"{url}/v1/sessions/{sid}", headers=h).json()
    deadline = time.time() + 20
    while session["active_turn_id"] and time.time() < deadline:
        time.sleep(0.2)
        session = requests.get(f"{url}/v1/sessions/{sid}", headers=h).json()
    assert session["active_turn_id"] is None


def test_session_waiting_for_an_approval_is_shown_and_answered(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start_dev(procs, tmp_path, port, STEPRUN_AGENTS=AGENTS)
    h = dev_key(tmp_path)
    sid = requests.post(f"{url}/v1/sessions", json={"agent": "bank"}, headers=h).json()["id"]
    tid = requests.post(f"{url}/v1/sessions/{sid}/turns", json={"input": "transfer 5 to bob"}, headers=h).json()["id"]
    assert requests.get(f"{url}/v1/turns/{tid}?wait=20", headers=h).json()["status"] == "requires_action"
    chat = spawn([str(BIN / "steprun"), "chat", "--url", url, "--session", sid], dev_env(), tmp_path)
    chat.expect(r"session \S+ with agent bank;")  # the agent's name, not "?"
    chat.expect_exact(f"[turn {tid} is waiting for you]")
    chat.expect(r"approve transfer\(.*\)\? \[y/N\] ")
    chat.sendline("y")
    chat.expect_exact("The result of transfer is sent 5.00 to")
    chat.expect_exact("you> ")
    chat.sendeof()
    chat.expect(pexpect.EOF)
    assert requests.get(f"{url}/v1/turns/{tid}", headers=h).json()["status"] == "completed"


def test_chat_carries_on_after_steprun_dev_restarts(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    dev = start_dev(procs, tmp_path, port, STEPRUN_AGENTS=AGENTS)
    chat = spawn([str(BIN / "steprun"), "chat", "--url", url, "--agent", "echo"], dev_env(), tmp_path)
    sid = session_of(chat)
    chat.sendline("one")
    chat.expect_exact("You said: one")
    chat.expect_exact("you> ")
    dev.kill(signal.SIGKILL)
    chat.expect_exact("[connection lost")
    start_dev(procs, tmp_path, port, STEPRUN_AGENTS=AGENTS)  # its in-memory event log starts empty
    chat.expect_exact("[reconnected]", timeout=60)
    chat.sendline("two")
    chat.expect_exact("You said: two")
    chat.expect_exact("you> ")
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    assert user_inputs(url, dev_key(tmp_path), sid) == ["one", "two"]


def test_a_message_typed_while_reconnecting_is_sent_once_the_web_is_back(procs: Procs, settings: Settings,
                                                                          tmp_path: Path) -> None:
    env = settings_env(settings)
    procs.worker()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gunicorn = [str(BIN / "gunicorn"), "api.wsgi:app", "-c", "python:api.gunicorn_conf", "-w", "1",
                "-b", f"127.0.0.1:{port}"]
    web = procs.start("web", gunicorn, env=env)
    wait_http(f"{url}/healthz", web)
    key = create_key_cli(env, f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}")
    chat = spawn([str(BIN / "steprun"), "chat", "--url", url, "--key", key, "--agent", "echo"], env, tmp_path)
    sid = session_of(chat)
    chat.sendline("first")
    chat.expect_exact("You said: first")
    chat.expect_exact("you> ")
    web.kill(signal.SIGKILL)  # the web restarts while the chat is idle
    chat.expect_exact("[connection lost")
    chat.sendline("second")  # typed while reconnecting
    time.sleep(1.5)
    web = procs.start("web", gunicorn, env=env)
    wait_http(f"{url}/healthz", web)
    chat.expect_exact("You said: second", timeout=60)
    chat.expect_exact("you> ")
    chat.sendeof()
    chat.expect(pexpect.EOF)
    h = {"Authorization": f"Bearer {key}"}
    assert user_inputs(url, h, sid) == ["first", "second"]  # sent once, not lost and not twice
