"""End to end with the real runtime and a tiny random llama (tools/tiny_models.py): the
server's greedy answers equal single-process mlx-lm's on the same weights, for one client
and for 8 at once on 2 local ranks, and a client that leaves mid-stream frees its slot."""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
engine_mod = pytest.importorskip("mlxdist.runtime.engine", reason="the runtime engine is not merged yet")

from mlxdist.runtime.config import EngineConfig  # noqa: E402
from mlxdist.server.app import ApiServer  # noqa: E402

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    tiny_models = pytest.importorskip("tiny_models")
    return tiny_models.make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", layers=4, seed=3)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Greedy text and token count from single-process mlx-lm: an independent reference."""
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(tiny_llama))

    def answer(messages: list[dict], max_tokens: int = MAX_TOKENS) -> tuple[str, int]:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        text, n = "", 0
        for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
            text += r.text
            n += 1
        return text, n

    return answer


def serve(model: Path, ranks: int) -> tuple[ApiServer, object]:
    engine = engine_mod.open_engine(str(model), EngineConfig(max_concurrent=4), ranks=ranks)
    return ApiServer(engine, "127.0.0.1", 0, quiet=True).start(), engine


@pytest.fixture(scope="module")
def one_rank(tiny_llama):
    server, engine = serve(tiny_llama, 1)
    yield server
    server.shutdown()
    engine.close()


@pytest.fixture(scope="module")
def two_ranks(tiny_llama):
    server, engine = serve(tiny_llama, 2)
    yield server
    server.shutdown()
    engine.close()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def ask(server, question: str, stream: bool) -> tuple[str, int]:
    kw = dict(model=server.engine.model_name, messages=[{"role": "user", "content": question}],
              temperature=0, max_tokens=MAX_TOKENS)
    if not stream:
        r = client(server).chat.completions.create(**kw)
        return r.choices[0].message.content, r.usage.completion_tokens
    chunks = list(client(server).chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage.completion_tokens


def test_chat_matches_mlx_lm(one_rank, reference):
    want = reference([{"role": "user", "content": "hello"}])
    assert want[1] == MAX_TOKENS and want[0].strip()  # a real answer, not an instant EOS
    assert ask(one_rank, "hello", stream=False) == want
    assert ask(one_rank, "hello", stream=True) == want


def test_completions_match_mlx_lm(one_rank, tiny_llama):
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(tiny_llama))
    want = "".join(r.text for r in stream_generate(model, tokenizer, "The sky is", max_tokens=MAX_TOKENS))
    r = client(one_rank).completions.create(model=one_rank.engine.model_name, prompt="The sky is",
                                            temperature=0, max_tokens=MAX_TOKENS)
    assert r.choices[0].text == want


def test_eight_concurrent_clients_on_two_ranks(two_ranks, reference):
    questions = [f"question number {i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda iq: ask(two_ranks, iq[1], stream=bool(iq[0] % 2)), enumerate(questions)))
    want = [reference([{"role": "user", "content": q}]) for q in questions]
    assert len(set(want)) > 1  # the questions get different answers, so a mix-up would show
    assert got == want


def open_stream(server, body: dict) -> socket.socket:
    """Start a streaming request on a raw socket and read its first bytes."""
    host, port = server.address
    sock = socket.create_connection((host, port), timeout=60)
    raw = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
    got = b""
    while got.count(b"data:") < 3:
        got += sock.recv(4096)
    assert got.startswith(b"HTTP/1.1 200")
    return sock


def active(server) -> float:
    with urllib.request.urlopen(server.url + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith("mlxdist_active_requests "):
                return float(line.split()[1])
    raise KeyError


def test_disconnect_mid_stream_frees_the_slot(two_ranks, reference):
    body = {"messages": [{"role": "user", "content": "go on"}], "stream": True, "max_tokens": 2000,
            "temperature": 0, "stop": ["never-appears"]}
    sock = open_stream(two_ranks, body)
    assert active(two_ranks) == 1
    sock.close()
    t0 = time.monotonic()
    while active(two_ranks) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert active(two_ranks) == 0
    t0 = time.monotonic()
    while two_ranks.engine.stats().get("requests_active", 0) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert two_ranks.engine.stats().get("requests_active", 0) == 0
    # the freed slot serves the next request, with the right answer
    assert ask(two_ranks, "hello", stream=False) == reference([{"role": "user", "content": "hello"}])


def test_r1_style_template_puts_the_output_in_reasoning(tiny_llama, tmp_path):
    """A chat template that ends the prompt inside `<think>` (as R1's does): with a real
    tokenizer, the answer so far is reasoning, exactly mlx-lm's text for the same prompt."""
    import shutil

    from mlx_lm import load, stream_generate

    r1 = tmp_path / "r1-style"
    shutil.copytree(tiny_llama, r1)
    template = (r1 / "chat_template.jinja").read_text()
    (r1 / "chat_template.jinja").write_text(template.replace("<|assistant|>{% endif %}",
                                                             "<|assistant|><think>{% endif %}"))
    model, tokenizer = load(str(r1))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "why?"}], add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<think>")
    want = "".join(x.text for x in stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS))
    assert "</think>" not in want and want.strip()

    server, engine = serve(r1, 1)
    try:
        r = client(server).chat.completions.create(model="r1-style", messages=[{"role": "user", "content": "why?"}],
                                                   temperature=0, max_tokens=MAX_TOKENS)
    finally:
        server.shutdown()
        engine.close()
    assert r.choices[0].message.reasoning_content == want.lstrip()
    assert r.choices[0].message.content == ""
