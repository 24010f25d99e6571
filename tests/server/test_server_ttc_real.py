"""Test-time compute over the real runtime: SmolLM2-135M-Instruct (the demo model) on 2
local ranks, through the official openai client. `n` runs its prompt once (the engine's
counters in /metrics), greedy choices equal mlx-lm's answer on the same weights, and the
consensus and search extensions answer with votes and scores that agree with the choices
they return (checked here with a regex of our own)."""

from __future__ import annotations

import re
import time
import urllib.request

import openai
import pytest

pytest.importorskip("quantize.convert", reason="the converter is not merged yet")

from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine  # noqa: E402
from mlxdist.server.app import ApiServer  # noqa: E402

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have? End with 'The answer is N.'"


@pytest.fixture(scope="module")
def served(smollm2_mlx):
    with open_engine(smollm2_mlx, EngineConfig(max_concurrent=8), ranks=2) as eng:
        server = ApiServer(eng, "127.0.0.1", 0, quiet=True).start()
        try:
            yield server, openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
        finally:
            server.shutdown()


def _engine_counters(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^mlxdist_engine_(\w+) (\S+)$", text, re.M)}


def _settled(url: str, before: dict, want: int) -> dict:
    """Rank 0 sends its counters with each request's end, just after the last token."""
    deadline = time.monotonic() + 60
    while True:
        now = _engine_counters(url)
        seen = sum(now.get(k, 0) - before.get(k, 0) for k in ("prefills", "prefix_shared"))
        if seen >= want or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def test_n_choices_run_the_prompt_once_and_equal_mlx_lm(served, smollm2_mlx):
    server, client = served
    before = _engine_counters(server.url)
    r = client.chat.completions.create(model=client.models.list().data[0].id, n=4, temperature=0, max_tokens=12,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    after = _settled(server.url, before, 4)
    assert after.get("prefills", 0) - before.get("prefills", 0) == 1
    assert after.get("prefix_shared", 0) - before.get("prefix_shared", 0) == 3

    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(smollm2_mlx))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    want = "".join(x.text for x in stream_generate(model, tokenizer, prompt, max_tokens=12))
    assert [c.message.content for c in r.choices] == [want] * 4


def _last_number(text: str) -> str | None:
    found = re.findall(r"-?\d+", text.replace(",", ""))
    return str(int(found[-1])) if found else None


def test_consensus_returns_the_majority_and_every_candidate(served):
    _, client = served
    r = client.chat.completions.create(
        model=client.models.list().data[0].id, temperature=0.8, seed=5, max_tokens=40,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"consensus": {"n": 4, "extract": "last_number", "early_stop": False}})
    body = r.model_extra["consensus"]
    answers = [_last_number(c.message.content) for c in r.choices]
    assert len(r.choices) == 4 and sum(v["count"] for v in body["votes"]) == sum(a is not None for a in answers)
    counts = {a: answers.count(a) for a in set(answers) if a is not None}
    if counts:
        assert counts[body["answer"]] == max(counts.values())
        assert answers[0] == body["answer"]


def test_best_of_n_with_the_model_as_its_own_judge(served):
    _, client = served
    r = client.chat.completions.create(
        model=client.models.list().data[0].id, temperature=0.8, seed=7, max_tokens=30,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"search": {"strategy": "best_of_n", "n": 3, "extract": "last_number"}})
    body = r.model_extra["search"]
    assert len(r.choices) == 3 and len(body["scores"]) == 3
    assert all(0.0 <= s <= 1.0 for s in body["scores"])
    assert body["verifier_calls"] >= 3
