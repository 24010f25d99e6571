"""Thinking budgets in `mlxdist chat`: `--think N` and `/think N|off` reach the request body,
reasoning sent as both `reasoning_content` and `reasoning` is taken once, and the thinking
summary gives the token count from usage (out of the budget when one is set).

A stub server (standard library) records each request's JSON and streams scripted SSE
chunks: the reasoning in both fields, then the answer, then a usage chunk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pexpect
import pytest

from mlxdist.chat.client import Answer, ChatClient
from mlxdist.chat.repl import parse_budget, thinking_summary

ROOT = Path(__file__).resolve().parents[2]
REASONING = ["I ponder", " the sky."]
CONTENT = ["Blue", " light."]
REASONING_TOKENS = 7


class Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.fields = ("reasoning_content", "reasoning")  # where the thinking goes in a delta
        self.details = True  # usage carries completion_tokens_details.reasoning_tokens

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def chunks(self) -> Iterator[dict[str, Any]]:
        yield {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        for piece in REASONING:
            yield {"choices": [{"index": 0, "delta": {f: piece for f in self.fields}}]}
        for piece in CONTENT:
            yield {"choices": [{"index": 0, "delta": {"content": piece}}]}
        yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        usage: dict[str, Any] = {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
        if self.details:
            usage["completion_tokens_details"] = {"reasoning_tokens": REASONING_TOKENS}
        yield {"choices": [], "usage": usage}


class _Handler(BaseHTTPRequestHandler):
    server: Stub

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.bodies.append(request)
        self.send_response(200)  # HTTP/1.0: the body ends when the connection closes
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for chunk in self.server.chunks():
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def stub() -> Iterator[Stub]:
    server = Stub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def chat_env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), MLXDIST_CHAT_HISTORY=str(tmp_path / "history"), TERM="xterm")


def test_client_takes_reasoning_once_and_its_token_count(stub: Stub) -> None:
    answer = ChatClient(stub.url).ask([{"role": "user", "content": "sky?"}], model="stub", thinking_budget=64)
    assert answer.reasoning == "I ponder the sky."  # both fields came: counted once
    assert answer.content == "Blue light."
    assert answer.reasoning_tokens == REASONING_TOKENS
    assert answer.completion_tokens == 12
    body = stub.bodies[-1]
    assert body["thinking_budget"] == 64
    assert body["stream_options"] == {"include_usage": True}


def test_client_reads_the_reasoning_field_alone(stub: Stub) -> None:
    stub.fields, stub.details = ("reasoning",), False
    answer = ChatClient(stub.url).ask([{"role": "user", "content": "sky?"}], model="stub")
    assert answer.reasoning == "I ponder the sky."
    assert answer.reasoning_tokens is None  # no count from the server: the summary says words
    assert re.fullmatch(r"\[thought for [\d.]+ s, 4 words; /think shows it\]", thinking_summary(answer))
    assert "thinking_budget" not in stub.bodies[-1]


def test_think_flag_and_command_reach_the_request(stub: Stub, tmp_path: Path) -> None:
    questions = "one\n/think 32\ntwo\n/think off\nthree\n/think\n/think lots\n/think -3\n"
    r = subprocess.run([sys.executable, "-m", "mlxdist", "chat", "--url", stub.url, "--think", "64"],
                       input=questions, env=chat_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert [b.get("thinking_budget") for b in stub.bodies] == [64, 32, None]
    out = r.stdout
    assert "thinking budget 64 tokens" in out  # said when the chat starts
    summaries = re.findall(r"\[thought for [\d.]+ s, ([^;]+); /think shows it\]", out)
    assert summaries == [f"{REASONING_TOKENS}/64 tokens", f"{REASONING_TOKENS}/32 tokens",
                         f"{REASONING_TOKENS} tokens"]
    assert "thinking budget: 32 tokens per answer" in out
    assert "thinking budget removed" in out
    assert out.count("I ponder the sky.") == 4  # three answers (left in place off a terminal) and /think
    assert "I ponderI ponder" not in out and "sky. the sky." not in out
    assert out.count("usage: /think [N|off]") == 2  # "lots" and -3 are refused, one line each


def test_think_in_a_terminal(stub: Stub, tmp_path: Path) -> None:
    child = pexpect.spawn(sys.executable, ["-m", "mlxdist", "chat", "--url", stub.url, "--think", "64"],
                          env=chat_env(tmp_path), cwd=str(tmp_path), encoding="utf-8", timeout=30,
                          dimensions=(40, 120))
    child.expect_exact(">>> ")
    child.sendline("/help")
    child.expect_exact("/think N")
    child.expect_exact("/think off")
    child.sendline("sky?")
    child.expect_exact("Blue light.")
    child.expect(rf"\[thought for [\d.]+ s, {REASONING_TOKENS}/64 tokens; /think shows it\]")
    child.expect_exact(">>> ")
    child.sendline("/think")
    child.expect_exact("I ponder the sky.")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert [b.get("thinking_budget") for b in stub.bodies] == [64]


def test_a_bad_think_flag_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mlxdist", "chat", "--url", "http://127.0.0.1:9", "--think", "-1"],
                       env=chat_env(tmp_path), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert r.stderr.startswith("mlxdist: error: invalid value for '--think'")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_summary_wording() -> None:
    a = Answer(reasoning="a b c", started=0.0, first_token=1.0, reasoning_done=4.2)
    assert thinking_summary(a) == "[thought for 3.2 s, 3 words; /think shows it]"
    assert thinking_summary(a, 512) == "[thought for 3.2 s, 3 words (budget 512 tokens); /think shows it]"
    a.reasoning_tokens = 412
    assert thinking_summary(a) == "[thought for 3.2 s, 412 tokens; /think shows it]"
    assert thinking_summary(a, 512) == "[thought for 3.2 s, 412/512 tokens; /think shows it]"
    a.reasoning_tokens = 1
    assert thinking_summary(a) == "[thought for 3.2 s, 1 token; /think shows it]"


@pytest.mark.parametrize("text, budget", [("0", 0), ("512", 512), ("-1", None), ("lots", None), ("1.5", None)])
def test_parse_budget(text: str, budget: int | None) -> None:
    assert parse_budget(text) == budget
