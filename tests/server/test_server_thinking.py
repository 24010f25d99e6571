"""Thinking budgets through the HTTP API, with the official openai client, on a tiny random
model whose chat template opens `<think>` (as DeepSeek-R1's does).

The references are independent: mlx-lm's generate_step on the prompt that the tokenizer's
own template makes (greedy), and the byte-level vocabulary (a token is one byte), so the
expected text is the reference tokens' bytes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from runtime_helpers import reference_tokens, tiny_models  # noqa: E402,F401

from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine  # noqa: E402
from mlxdist.server.app import ApiServer  # noqa: E402

THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)
CLOSE = b"</think>"
N = 40


@pytest.fixture(scope="module")
def thinking_model(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("thinker") / "llama"
    shutil.copytree(tiny_models["llama"], out)
    cfg = out / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    (out / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    return out


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def client(request, thinking_model):
    ranks = request.param
    split = [3, 3] if ranks == 2 else None
    with open_engine(thinking_model, EngineConfig(max_concurrent=8), ranks=ranks, split=split) as eng:
        server = ApiServer(eng, "127.0.0.1", 0, quiet=True, efforts={"none": 0, "low": 7, "medium": 12,
                                                                     "high": 100, "minimal": 3}).start()
        try:
            yield openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        finally:
            server.shutdown()


def _prompt(model: Path, question: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    out = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _ask(client, **extra):
    return client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "2+2?"}],
                                          max_tokens=N, temperature=0, extra_body=extra or None)


def _text(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", "replace")


@pytest.mark.parametrize("fields,budget", [
    ({"thinking_budget": 5}, 5),
    ({"thinking_token_budget": 5}, 5),
    ({"thinking_budget_tokens": 9}, 9),
    ({"thinking": {"type": "enabled", "budget_tokens": 0}}, 0),
    ({"reasoning": {"max_tokens": 9}}, 9),
    ({"reasoning_effort": "low"}, 7),
])
def test_every_spelling_of_a_budget_closes_the_thinking_there(client, thinking_model, fields, budget):
    prompt = _prompt(thinking_model, "2+2?")
    free = reference_tokens(thinking_model, prompt, N)
    assert CLOSE not in bytes(t for t in free if t < 256)  # this model never closes by itself
    r = _ask(client, **fields)
    msg = r.choices[0].message
    head = free[:budget] + list(CLOSE)
    rest = reference_tokens(thinking_model, prompt + head, N - len(head))
    extra = msg.model_extra  # the openai client keeps fields it does not know here
    assert (extra.get("reasoning_content") or "") == _text(free[:budget]).lstrip()
    assert extra.get("reasoning") == extra.get("reasoning_content")
    assert msg.content == _text(rest).lstrip()
    assert r.usage.completion_tokens == N
    assert r.usage.completion_tokens_details.reasoning_tokens == budget + len(CLOSE)


def test_no_budget_thinks_to_the_end_and_counts_it(client, thinking_model):
    r = _ask(client)
    free = reference_tokens(thinking_model, _prompt(thinking_model, "2+2?"), N)
    assert r.choices[0].message.model_extra["reasoning_content"] == _text(free).lstrip()
    assert r.usage.completion_tokens_details.reasoning_tokens == N


def test_stream_carries_both_reasoning_fields_and_the_count(client, thinking_model):
    stream = client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "2+2?"}], max_tokens=N, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"thinking_budget": 6})
    reasoning, reasoning2, content, usage = "", "", "", None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += c.delta.model_extra.get("reasoning_content") or ""
            reasoning2 += c.delta.model_extra.get("reasoning") or ""
            content += c.delta.content or ""
    free = reference_tokens(thinking_model, _prompt(thinking_model, "2+2?"), N)
    assert reasoning == reasoning2 == _text(free[:6]).lstrip()
    assert content
    assert usage.completion_tokens_details.reasoning_tokens == 6 + len(CLOSE)


@pytest.mark.parametrize("fields,word", [
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"thinking_budget": -1}, "thinking_budget"),
    ({"thinking_budget": 5, "reasoning_effort": "high"}, "conflicting"),
    ({"thinking": "yes"}, "thinking"),
])
def test_bad_budgets_are_one_line_400s(client, fields, word):
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, **fields)
    assert word in e.value.body["message"] and "\n" not in e.value.body["message"]
