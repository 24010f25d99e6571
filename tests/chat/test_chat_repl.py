"""`mlxdist chat` in a pseudo-terminal (pexpect), against a server over the fake engine:
a question, reasoning folded away, an interrupted answer, commands, Ctrl-D."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pexpect
import pytest
from fake_engine import FakeEngine

from mlxdist.server.app import ApiServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_server():
    engine = FakeEngine(delay=0.01)
    server = ApiServer(engine, "127.0.0.1", 0, quiet=True).start()
    yield server
    server.shutdown()


def spawn_chat(url: str, tmp_path: Path) -> pexpect.spawn:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLXDIST_CHAT_HISTORY=str(tmp_path / "history"), TERM="xterm")
    child = pexpect.spawn(sys.executable, ["-m", "mlxdist", "chat", "--url", url], env=env, cwd=str(tmp_path),
                          encoding="utf-8", timeout=30, dimensions=(40, 120))
    child.expect_exact(">>> ")
    return child


def test_question_interrupt_command_exit(fake_server, tmp_path):
    child = spawn_chat(fake_server.url, tmp_path)
    child.sendline("hello there")
    child.expect_exact("Answer to hello there")
    child.expect(r"\d+ tokens.*tok/s, first token [\d.]+ s")
    child.expect_exact(">>> ")

    fake_server.engine.delay = 0.3  # slow enough to interrupt
    child.sendline("a slow one")
    child.expect_exact("Answer")
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(">>> ")
    t0 = time.monotonic()
    while fake_server.engine.stats()["active"] and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert fake_server.engine.stats()["active"] == 0  # the server cancelled the stopped answer
    fake_server.engine.delay = 0.01

    child.sendline("/save conv.json")
    child.expect_exact("saved 4 messages")
    saved = json.loads((tmp_path / "conv.json").read_text())
    assert saved["messages"][0] == {"role": "user", "content": "hello there"}
    assert saved["messages"][1] == {"role": "assistant", "content": "Answer to hello there"}
    child.sendline("/stats")
    child.expect(r"session: 2 answers")
    child.sendline("/reset")
    child.expect_exact("conversation forgotten")
    child.sendline("/load conv.json")
    child.expect_exact("loaded 4 messages")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "hello there" in (tmp_path / "history").read_text()  # readline history kept


def test_reasoning_is_folded_and_shown_on_request(fake_server, tmp_path):
    child = spawn_chat(fake_server.url, tmp_path)
    child.sendline("think: sky")
    child.expect_exact("I ponder")  # streamed while thinking
    child.expect_exact("Answer to think: sky")
    # after the answer: the count (tokens from usage, or words) comes with the last chunk
    child.expect(r"\[thought for [\d.]+ s, \d+ (words|tokens); /think shows it\]")
    child.expect_exact(">>> ")
    child.sendline("/think")
    child.expect_exact("I ponder think: sky.")
    child.sendline("/system be brief")
    child.expect_exact("system prompt set")
    child.sendline("/help")
    child.expect_exact("/reset")
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_unreachable_server_is_a_clear_error(tmp_path):
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "mlxdist", "chat", "--url", "http://127.0.0.1:9"], env=env,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert r.stderr.startswith("mlxdist: error: cannot reach the server") and "Traceback" not in r.stderr
