"""Stages loaded from a shard directory (docs/shard-format.md); a shard that disagrees with
the plan is refused before any compute."""

from __future__ import annotations

import json

import pytest
from runtime_helpers import reference_tokens, write_shard_dir

from mlxdist.errors import UserError
from mlxdist.runtime.engine import open_engine
from mlxdist.runtime.group import WorkerFailure
from mlxdist.runtime.shards import ShardMismatch, verify_stage
from mlxdist.runtime.source import resolve_source

PROMPT = list(b"shards of a model")


@pytest.fixture(scope="module")
def shard_dir(tiny_models, tmp_path_factory):
    # qwen3 ties its embeddings: the last stage holds a copy as its head
    return write_shard_dir(tiny_models["qwen3"], tmp_path_factory.mktemp("s") / "out", [(0, 1), (1, 4)])


def test_shard_stages_are_token_exact(shard_dir, tiny_models):
    src = resolve_source(shard_dir, 2, [1, 3])
    assert [s.shard for s in src.stages] == [True, True]
    for plan in src.stages:
        verify_stage(shard_dir, plan)
    ref = reference_tokens(tiny_models["qwen3"], PROMPT, 6)
    with open_engine(shard_dir, ranks=2, split=[1, 3]) as eng:
        assert eng.generate(PROMPT, max_tokens=6) == ref
    with open_engine(shard_dir) as eng:  # one rank: the whole model through the root's links
        assert eng.generate(PROMPT, max_tokens=6) == ref


def test_mismatched_shards_are_refused(shard_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad, symlinks=True)
    src = resolve_source(bad, 2, [1, 3])
    stage_json = bad / "stages" / "1" / "stage.json"
    good = stage_json.read_text()
    stage_json.write_text(json.dumps({**json.loads(good), "layers": [1, 3]}))
    with pytest.raises(ShardMismatch, match="holds layers"):
        verify_stage(bad, src.stages[1])
    stage_json.write_text(good)
    weights = bad / "stages" / "1" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the last tensor's bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(ShardMismatch, match="sha256"):
        verify_stage(bad, src.stages[1])
    with pytest.raises(WorkerFailure, match="rank 1 on 127.0.0.1 failed: .*sha256"):
        open_engine(bad, ranks=2, split=[1, 3])
    assert issubclass(ShardMismatch, UserError)
