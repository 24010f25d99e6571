"""The real demo model (SmolLM2-135M, converted by `mlxdist quantize` from its GGUF; the
`smollm2_mlx` fixture comes from tests/conftest.py): 2 ranks over the ring backend give
mlx-lm's greedy tokens. MLX's CPU backend is slow on its float16 weights, so the prompt and
the answer are short."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_helpers import reference_tokens

from mlxdist.runtime.engine import open_engine


@pytest.fixture
def smollm2_model(request) -> Path:
    try:
        path = request.getfixturevalue("smollm2_mlx")
    except pytest.FixtureLookupError:
        pytest.skip("no smollm2_mlx fixture (comes with the quantize area's tests/conftest.py)")
    return Path(path)


def test_smollm2_two_ranks_match_mlx_lm(smollm2_model):
    prompt = [1, 504]  # "<|im_start|>The"
    ref = reference_tokens(smollm2_model, prompt, 3)
    with open_engine(smollm2_model, ranks=2, split=[11, 19]) as eng:
        assert eng.generate(prompt, max_tokens=3) == ref
