"""N ranks as real processes over the MLX ring backend on 127.0.0.1: greedy output equal to
single-process mlx-lm for 2, 3 and 4 ranks and uneven splits; seeded sampling equal across
rank counts; concurrent requests equal to the same requests alone."""

from __future__ import annotations

import threading

import pytest
from runtime_helpers import reference_tokens

from mlxdist.runtime.api import GenerationRequest, SamplingParams
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
    ("llama_q4", [1, 3]),
])
def test_ranks_match_single_process(tiny_models, arch, split):
    path = tiny_models[arch]
    ref = reference_tokens(path, PROMPT, N_TOK)
    seeded = _seeded(path)
    with open_engine(path, ranks=len(split), split=split, max_concurrent=4) as eng:
        assert eng.generate(PROMPT, max_tokens=N_TOK) == ref
        assert eng.submit(GenerationRequest(tuple(PROMPT), N_TOK, SAMPLING)).tokens() == seeded
        if len(split) in (2, 4):  # 4 concurrent requests, each as alone
            prompts = [PROMPT, PROMPT[:7], list(b"xyz"), list(b"a longer prompt than the others")]
            alone = [eng.generate(p, max_tokens=N_TOK) for p in prompts]
            handles = [eng.submit(GenerationRequest(tuple(p), N_TOK)) for p in prompts]
            out: dict[int, list[int]] = {}
            ts = [threading.Thread(target=lambda i=i, h=h: out.__setitem__(i, h.tokens()))
                  for i, h in enumerate(handles)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(120)
            assert [out[i] for i in range(4)] == alone
        assert eng.failure is None
    assert all(code is not None for code in eng._backend.launcher.poll().values())


def test_chunked_prefill_across_ranks(tiny_models):
    path = tiny_models["deepseek_v3"]
    with open_engine(path, ranks=2, split=[2, 4], prefill_step=5) as eng:
        assert eng.generate(PROMPT, max_tokens=5) == reference_tokens(path, PROMPT, 5, prefill_step=5)
