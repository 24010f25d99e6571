"""A rank running several parts of an expert-parallel conversion (what a re-placement
after a node loss gives a survivor): from a conversion cut for three nodes, two local
ranks, rank 0 holding parts 0 and 2, its stacked experts theirs concatenated. Greedy
tokens equal mlx-lm's on the unsliced conversion; experts that are not whole parts are
refused in one line."""

from __future__ import annotations

import json

import pytest
from quantize_helpers import make_checkpoint

from mlxdist.errors import UserError
from mlxdist.placement import NodeSpec, place
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine
from mlxdist.runtime.source import resolve_source
from mlxdist.shard_format import Manifest
from quantize.convert import convert

from test_quantize_expert_parts import MAX_TOKENS, PROMPT

GB = 1 << 30


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A DeepSeek checkpoint (8 routed experts) cut by an expert-parallel plan over three
    nodes, and the same conversion in one stage (float32 floats, as the fixtures of
    test_quantize_expert_parts.py)."""
    d = tmp_path_factory.mktemp("ep-three")
    ckpt = make_checkpoint.deepseek(d / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    # three slow equal nodes on a fast link, many requests: EP over all three is the fastest
    nodes = [NodeSpec(f"n{i}", 16 * GB, 1e9, 1e10, 0) for i in range(3)]
    plan = place(str(ckpt), nodes, context=128, concurrency=8, link="tb5-rdma", strategy="expert-parallel")
    assert plan.group == ("n0", "n1", "n2")
    (d / "plan.json").write_text(json.dumps(plan.to_json()))
    out = convert(ckpt, d / "out", plan=d / "plan.json", progress=False)
    whole = convert(ckpt, d / "whole", stages=1, progress=False)
    return out, whole


def test_a_rank_runs_two_parts_token_exact(three):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    out, whole = three
    parts = Manifest.load(out).stages[0].parts
    assert len(parts) == 3
    experts = (parts[0].experts + parts[2].experts, parts[1].experts)
    source = resolve_source(out, 2, expert_parallel=True, experts=experts)
    assert [(s.model_dir, s.parts) for s in source.stages] == [
        (out / parts[0].dir, (out / parts[0].dir, out / parts[2].dir)), (out / parts[1].dir, ())]
    assert source.experts == experts

    model, _ = load_model(whole)
    want = [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=MAX_TOKENS,
                                             sampler=lambda lp: mx.argmax(lp, axis=-1))]
    with open_engine(out, EngineConfig(expert_parallel=True, experts=experts), ranks=2) as eng:
        assert [st.experts for st in eng.layout().stages] == list(experts)
        assert eng.generate(PROMPT, max_tokens=MAX_TOKENS) == want


def test_experts_that_are_not_whole_parts_are_refused(three):
    out, _ = three
    parts = Manifest.load(out).stages[0].parts
    mixed = (parts[0].experts[1:] + parts[2].experts, parts[0].experts[:1] + parts[1].experts)
    with pytest.raises(UserError, match="rank 0's experts .* are not whole parts' .* in their row order"):
        resolve_source(out, 2, expert_parallel=True, experts=mixed)
    backwards = (parts[2].experts + parts[0].experts[::-1], parts[1].experts)
    with pytest.raises(UserError, match="rank 0's experts"):
        resolve_source(out, 2, expert_parallel=True, experts=backwards)
