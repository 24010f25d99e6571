"""Expert-parallel MoE blocks: partial outputs summed over ranks equal the single-device
block, and greedy generation over 2 and 4 real ring ranks equals mlx-lm's single process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.placement.ranks import run_ranks
from tests.placement.tiny import make_tiny_deepseek

PROMPT = [1, 5, 9, 33, 100, 7, 42]
MAX_TOKENS = 10
WORKER = str(Path(__file__).with_name("ep_worker.py"))


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory) -> Path:
    return make_tiny_deepseek(tmp_path_factory.mktemp("tiny_deepseek"))


@pytest.fixture(scope="module")
def reference(tiny_deepseek):
    """mlx-lm's own single-process greedy generation (generate_step is what
    mlx_lm.generate runs), with its log-probabilities of the first token."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(tiny_deepseek)
    steps = list(generate_step(mx.array(PROMPT), model, max_tokens=MAX_TOKENS,
                               sampler=lambda lp: mx.argmax(lp, axis=-1)))
    return [int(t) for t, _ in steps], steps[0][1].tolist()


def _single_group():
    import mlx.core as mx

    return mx.distributed.init()  # no hostfile: the group of this process alone


@pytest.mark.parametrize("arch,quantized", [("deepseek_v3", False), ("deepseek_v3", True), ("qwen3_moe", False)])
def test_partial_outputs_sum_to_the_block(arch: str, quantized: bool) -> None:
    """Split a block's experts 3 ways; the three partial outputs (shared experts counted
    once) add up to the untouched block's output."""
    import copy

    import mlx.core as mx

    from mlxdist.runtime.expert_parallel import ExpertParallelMoE, split_experts

    mx.random.seed(1)
    if arch == "deepseek_v3":
        from mlx_lm.models import deepseek_v3 as m

        from tests.placement.tiny import TINY_DEEPSEEK

        block = m.DeepseekV3MoE(m.ModelArgs.from_dict(TINY_DEEPSEEK))
        block.gate.weight = mx.random.normal(block.gate.weight.shape)
        block.gate.e_score_correction_bias = mx.random.normal((TINY_DEEPSEEK["n_routed_experts"],)) * 0.1
        n, d = TINY_DEEPSEEK["n_routed_experts"], TINY_DEEPSEEK["hidden_size"]
    else:
        from mlx_lm.models import qwen3_moe as m

        args = m.ModelArgs(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=1, intermediate_size=96,
                           num_attention_heads=4, num_experts=12, num_experts_per_tok=3, decoder_sparse_step=1,
                           mlp_only_layers=[], moe_intermediate_size=32, rms_norm_eps=1e-6, vocab_size=64,
                           num_key_value_heads=2, head_dim=16, rope_theta=1e4, tie_word_embeddings=False,
                           max_position_embeddings=128, norm_topk_prob=True)
        block = m.Qwen3MoeSparseMoeBlock(args)
        n, d = 12, 64
    if quantized:  # QuantizedSwitchLinear experts: weight, scales and biases are cut alike
        import mlx.nn as nn

        nn.quantize(block, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % 32 == 0 and not p.endswith("gate"))
    x = mx.random.normal((2, 5, d))
    want = block(x)
    parts = [ExpertParallelMoE(copy.deepcopy(block), owned, _single_group(), holds_shared=(i == 0))(x)
             for i, owned in enumerate(split_experts(n, 3, [3, 1, 2]))]
    got = parts[0] + parts[1] + parts[2]
    assert mx.allclose(got, want, atol=1e-5, rtol=1e-5).item()
    assert not mx.allclose(parts[0], want, atol=1e-3).item()  # one part alone is not the answer


@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_generation_is_token_exact(tiny_deepseek, reference, tmp_path, ranks: int) -> None:
    out = tmp_path / "out.json"
    results = run_ranks(ranks, [WORKER, str(tiny_deepseek), str(out), ",".join(map(str, PROMPT)),
                                str(MAX_TOKENS), "ep"], timeout=180)
    assert all(rc == 0 for rc, _ in results), "\n".join(err for _, err in results)
    got = json.loads(out.read_text())
    want_tokens, want_logprobs = reference
    assert got["patched_blocks"] == 3  # layers 1..3 are MoE, layer 0 dense
    assert len(got["owned"]) == 16 // ranks
    assert got["ranks_agree"], "ranks generated different tokens"
    assert got["tokens"] == want_tokens
    # summed in another order, so close rather than bit-identical
    import numpy as np

    np.testing.assert_allclose(np.array(got["logprobs0"]), np.array(want_logprobs), atol=1e-4, rtol=1e-4)


def test_owned_experts_from_a_plan() -> None:
    from mlxdist.placement import node_from_chip, place
    from mlxdist.runtime.expert_parallel import owned_experts_from_plan

    nodes = [node_from_chip("a", "M3 Ultra", 512), node_from_chip("b", "M2 Ultra", 512)]
    plan = place("deepseek-r1", nodes, context=4096, concurrency=1, link="tb5-rdma", strategy="expert-parallel")
    a, b = owned_experts_from_plan(plan, "a"), owned_experts_from_plan(plan, "b")
    assert list(a) == list(b) == [(0, 61)]
    assert sorted(a[(0, 61)] + b[(0, 61)]) == list(range(256))
    assert len(a[(0, 61)]) > len(b[(0, 61)])  # 819 vs 800 GB/s: the faster node holds more
