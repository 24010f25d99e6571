"""The real demo model (SmolLM2-135M, converted by `mlxdist quantize` from its GGUF into a
2-stage shard directory; the `smollm2_mlx` fixture comes from tests/conftest.py): greedy
tokens equal mlx-lm's, over the shard stages on 2 ranks and by layer index on 3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runtime_helpers import reference_tokens

from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine
from mlxdist.runtime.source import resolve_source


@pytest.fixture
def smollm2_model(request) -> Path:
    try:
        path = request.getfixturevalue("smollm2_mlx")
    except pytest.FixtureLookupError:
        pytest.skip("no smollm2_mlx fixture (comes with the quantize area's tests/conftest.py)")
    return Path(path)


def test_smollm2_ranks_match_mlx_lm(smollm2_model):
    with open_engine(smollm2_model, EngineConfig(max_concurrent=2), ranks=2,
                     split=_shard_split(smollm2_model)) as eng:
        prompt = eng.encode_chat([{"role": "user", "content": "Capital of France?"}])
        ref = reference_tokens(smollm2_model, prompt, 6)
        assert eng.generate(prompt, max_tokens=6) == ref
    src = resolve_source(smollm2_model, 2, _shard_split(smollm2_model))
    assert all(s.shard for s in src.stages)
    with open_engine(smollm2_model, ranks=3, split=[11, 10, 9]) as eng:
        assert eng.generate(prompt, max_tokens=6) == ref


def _shard_split(path: Path) -> list[int]:
    stages = json.loads((path / "manifest.json").read_text())["stages"]
    if len(stages) != 2:
        pytest.skip(f"the fixture has {len(stages)} stages, this test expects 2")
    return [b - a for a, b in (s["layers"] for s in stages)]
