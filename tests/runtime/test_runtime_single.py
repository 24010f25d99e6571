"""ranks=1 (in process): token-exact with mlx-lm, chunked prefill, sampling, stop rules."""

from __future__ import annotations


import pytest
from runtime_helpers import drain_concurrently, reference_tokens, tiny_models  # noqa: F401 (fixture)

from mlxdist.runtime.api import GenerationRequest, SamplingParams
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine

PROMPT = list(b"The quick brown fox jumps over the lazy dog.")


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3", "qwen3", "qwen3_moe", "llama_q4"])
def test_greedy_matches_mlx_lm(tiny_models, arch):
    path = tiny_models[arch]
    with open_engine(path) as eng:
        assert eng.generate(PROMPT, max_tokens=12) == reference_tokens(path, PROMPT, 12)


def test_chunked_prefill_matches_mlx_lm(tiny_models):
    path = tiny_models["deepseek_v3"]
    with open_engine(path, EngineConfig(prefill_step=8)) as eng:
        assert eng.generate(PROMPT, max_tokens=6) == reference_tokens(path, PROMPT, 6, prefill_step=8)


def test_concurrent_requests_match_alone_and_seeded_sampling(tiny_models):
    path = tiny_models["llama"]
    prompts = [PROMPT, PROMPT[:10], list(b"hello"), list(b"another prompt here")]
    sampling = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=7)
    with open_engine(path, EngineConfig(max_concurrent=4)) as eng:
        alone = [eng.generate(p, max_tokens=8) for p in prompts]
        seeded = eng.submit(GenerationRequest(tuple(PROMPT), 8, sampling)).tokens()
        handles = [eng.submit(GenerationRequest(tuple(p), 8)) for p in prompts]
        handles.append(eng.submit(GenerationRequest(tuple(PROMPT), 8, sampling)))
        results = drain_concurrently(handles, timeout=60)
        assert results[:4] == alone
        assert results[4] == seeded
        other_seed = eng.submit(GenerationRequest(tuple(PROMPT), 8, SamplingParams(0.9, seed=8))).tokens()
        assert other_seed != seeded


def test_stop_string_max_tokens_cancel(tiny_models):
    path = tiny_models["llama"]
    with open_engine(path) as eng:
        full = list(eng.submit(GenerationRequest(tuple(PROMPT), 10)))
        assert full[-1].finish_reason == "length" and len(full) == 10
        text = "".join(e.text for e in full)
        stop = text[3:5]
        assert stop
        events = list(eng.submit(GenerationRequest(tuple(PROMPT), 10, stop_strings=(stop,))))
        assert events[-1].finish_reason == "stop"
        assert "".join(e.text for e in events) == text[:text.index(stop)]
        eos_at = full[2].token
        events = list(eng.submit(GenerationRequest(tuple(PROMPT), 10, stop_token_ids=(eos_at,))))
        assert events[-1].finish_reason == "stop" and len(events) == 3
        h = eng.submit(GenerationRequest(tuple(PROMPT), 10_00))
        first = next(iter(h))
        h.cancel()
        rest = list(h)
        assert first.token is not None and rest[-1].finish_reason == "cancelled"
        assert eng.stats()["requests_active"] == 0


def test_encode_chat_uses_template(tiny_models):
    with open_engine(tiny_models["llama"]) as eng:
        ids = eng.encode_chat([{"role": "user", "content": "hi"}])
        assert bytes(ids) == b"<|user|>hi\n<|assistant|>"
