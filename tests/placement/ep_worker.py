"""One rank of an expert-parallel run (launched by test_placement_expert_parallel.py,
tests/quantize/test_quantize_expert_parts.py and tools/bench_placement.py): loads the
whole tiny model, keeps its experts, generates greedily with mlx-lm's own generate_step,
and rank 0 writes the tokens (and first logits) as JSON.

argv: MODEL_DIR OUT_JSON PROMPT_IDS(comma) MAX_TOKENS [MODE=ep|pp|part]
(pp: mlx-lm's own even pipeline split, the baseline the bench compares against; part:
MODEL_DIR is an expert-parallel conversion and rank r loads node r's part through the
runtime, checked against the manifest; every rank's resident weight bytes are reported)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.utils import load_model

from mlxdist.runtime.expert_parallel import ExpertParallelMoE, expert_parallel, split_experts


def main() -> None:
    model_dir, out, prompt, max_tokens = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    # one rank runs without a hostfile: the group of this process alone
    group = mx.distributed.init(backend="ring", strict="MLX_HOSTFILE" in os.environ)
    rank, size = group.rank(), group.size()
    mode = sys.argv[5] if len(sys.argv) > 5 else "ep"
    if mode == "part":
        model, config, owned = load_part(Path(model_dir), group)
        patched = sum(isinstance(layer.mlp, ExpertParallelMoE) for layer in model.model.layers)
    elif mode == "ep":
        model, config = load_model(Path(model_dir))
        owned = split_experts(config["n_routed_experts"], size)[rank]
        patched = expert_parallel(model, owned, group)
    else:  # mlx-lm's own pipeline: an even split of the layers, the baseline
        model, config = load_model(Path(model_dir))
        owned, patched = list(range(config["n_routed_experts"])), 0
        model.model.pipeline(group)
    mx.eval(model.parameters())
    resident = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    prompt_ids = mx.array([int(t) for t in prompt.split(",")])
    tokens, first_logits, times = [], None, []
    t0 = time.perf_counter()
    for tok, logprobs in generate_step(prompt_ids, model, max_tokens=max_tokens,
                                       sampler=lambda lp: mx.argmax(lp, axis=-1)):
        tokens.append(int(tok))
        if first_logits is None:
            first_logits = logprobs.tolist()
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    # every rank must have produced the same tokens: compare through the group
    # generate_step leaves one step in flight on its own stream: let it finish everywhere
    # before another collective, or ranks would pair different collectives
    mx.synchronize(generation_stream)
    mine = mx.array(tokens, dtype=mx.float32)
    total = mx.distributed.all_sum(mx.stack([mine, mine * mine]), group=group)
    agree = bool(mx.all(total == mx.stack([mine, mine * mine]) * size).item())  # zero variance
    # one all_sum of a decode step's hidden state, timed: the link cost the cost model needs
    h = mx.zeros((1, 1, config["hidden_size"]), dtype=mx.float32)
    mx.eval(mx.distributed.all_sum(h, group=group))
    t0 = time.perf_counter()
    for _ in range(50):
        mx.eval(mx.distributed.all_sum(h, group=group))
    allsum_s = (time.perf_counter() - t0) / 50
    # every rank's resident weight bytes, gathered to rank 0
    mine_bytes = mx.zeros((size,), dtype=mx.float32).at[rank].add(float(resident))
    resident_all = [int(b) for b in mx.distributed.all_sum(mine_bytes, group=group).tolist()]
    if rank == 0:
        out.write_text(json.dumps({"allsum_s": allsum_s, "resident_bytes": resident_all, "tokens": tokens, "logprobs0": first_logits, "ranks": size,
                                   "patched_blocks": patched, "owned": owned, "ranks_agree": agree,
                                   "step_s": times}))


def load_part(root: Path, group):
    """This rank's part of an expert-parallel conversion, as a worker loads it: verified
    against the manifest, loaded with only its experts' rows."""
    from mlxdist.runtime.ep_stage import keep_own_experts
    from mlxdist.runtime.shards import verify_stage
    from mlxdist.runtime.source import resolve_source
    from mlxdist.runtime.stage import StageSpec, load_stage

    source = resolve_source(root, group.size(), expert_parallel=True)
    plan = source.stages[group.rank()]
    verify_stage(root, plan)
    owned = list(source.experts[group.rank()])
    stage = load_stage(plan.model_dir, StageSpec(plan.start, plan.end, plan.num_layers), presanitized=True,
                       prepare=lambda model: keep_own_experts(model.model, group, owned))
    return stage.model, stage.config, owned


if __name__ == "__main__":
    main()
