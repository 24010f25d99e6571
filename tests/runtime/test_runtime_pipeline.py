"""N ranks as real processes over the MLX ring backend on 127.0.0.1: greedy output equal to
single-process mlx-lm for 2, 3 and 4 ranks and uneven splits; seeded sampling equal across
rank counts; concurrent requests equal to the same requests alone."""

from __future__ import annotations


import pytest
from runtime_helpers import drain_concurrently, reference_tokens, tiny_models  # noqa: F401 (fixture)

from mlxdist.runtime.api import GenerationRequest, SamplingParams
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine

PROMPT = list(b"Pipelines keep every stage busy.")
SAMPLING = SamplingParams(temperature=0.8, top_k=40, repetition_penalty=1.1, seed=11)
N_TOK = 8


def _seeded(path):
    with open_engine(path) as eng:
        return eng.submit(GenerationRequest(tuple(PROMPT), N_TOK, SAMPLING)).tokens()


@pytest.mark.parametrize("arch,split", [
    ("llama", [3, 3]),
    ("llama", [1, 3, 2]),
    ("llama", [2, 1, 1, 2]),
    ("deepseek_v3", [1, 5]),        # boundary inside the dense prefix (layers 0-1 dense)
    ("deepseek_v3", [3, 1, 2]),     # boundaries in the MoE part
    ("deepseek_v3", [1, 1, 3, 1]),  # both, on 4 ranks
    ("llama_q4", [1, 3]),
])
def test_ranks_match_single_process(tiny_models, arch, split):
    path = tiny_models[arch]
    ref = reference_tokens(path, PROMPT, N_TOK)
    seeded = _seeded(path)
    with open_engine(path, EngineConfig(max_concurrent=4), ranks=len(split), split=split) as eng:
        assert eng.generate(PROMPT, max_tokens=N_TOK) == ref
        assert eng.submit(GenerationRequest(tuple(PROMPT), N_TOK, SAMPLING)).tokens() == seeded
        if len(split) in (2, 4):  # 4 concurrent requests, each as alone
            prompts = [PROMPT, PROMPT[:7], list(b"xyz"), list(b"a longer prompt than the others")]
            alone = [eng.generate(p, max_tokens=N_TOK) for p in prompts]
            handles = [eng.submit(GenerationRequest(tuple(p), N_TOK)) for p in prompts]
            assert drain_concurrently(handles) == alone
        assert eng.failure is None
    assert all(code is not None for code in eng._backend.launcher.poll().values())


def test_chunked_prefill_across_ranks(tiny_models):
    path = tiny_models["deepseek_v3"]
    with open_engine(path, EngineConfig(prefill_step=5), ranks=2, split=[2, 4]) as eng:
        assert eng.generate(PROMPT, max_tokens=5) == reference_tokens(path, PROMPT, 5, prefill_step=5)


def test_top_logprobs_match_mlx_lm(tiny_models):
    from runtime_helpers import reference_top_logprobs

    path = tiny_models["llama"]
    ref = reference_top_logprobs(path, PROMPT, 4, 3)
    for ranks in (1, 2):
        with open_engine(path, ranks=ranks, split=[4, 2] if ranks == 2 else None) as eng:
            events = list(eng.submit(GenerationRequest(tuple(PROMPT), 4, logprobs=3)))
        for ev, want in zip(events, ref):
            assert [i for i, _ in ev.top_logprobs] == [i for i, _ in want]
            assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(ev.top_logprobs, want))
            assert ev.top_logprobs[0][0] == ev.token and abs(ev.logprob - want[0][1]) < 1e-5


def test_chained_steps_when_ranks_poll(tiny_models, monkeypatch):
    """With polling ranks (cores to spare; forced here) a lone group's next step is queued
    before its tokens are back: still token-exact, stops exactly at max_tokens and stop ids."""
    monkeypatch.setenv("MLXDIST_RING_SELECT", "0")
    path = tiny_models["deepseek_v3"]
    ref = reference_tokens(path, PROMPT, N_TOK)
    seeded = _seeded(path)
    with open_engine(path, ranks=3, split=[1, 3, 2]) as eng:
        assert eng.generate(PROMPT, max_tokens=N_TOK) == ref
        assert eng.generate(PROMPT, max_tokens=1) == ref[:1]
        assert eng.submit(GenerationRequest(tuple(PROMPT), N_TOK, SAMPLING)).tokens() == seeded
        stop_at = ref[3]
        events = list(eng.submit(GenerationRequest(tuple(PROMPT), N_TOK, stop_token_ids=(stop_at,))))
        assert [e.token for e in events] == ref[:ref.index(stop_at) + 1]
        assert events[-1].finish_reason == "stop"
        assert eng.generate(PROMPT, max_tokens=N_TOK) == ref  # the slot was freed cleanly
        assert eng.stats().get("chained", 0) > 0
