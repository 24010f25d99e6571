"""One rank of an expert-parallel run (launched by test_placement_expert_parallel.py and
tools/bench_placement.py): loads the whole tiny model, keeps its experts, generates greedily
with mlx-lm's own generate_step, and rank 0 writes the tokens (and first logits) as JSON.

argv: MODEL_DIR OUT_JSON PROMPT_IDS(comma) MAX_TOKENS [MODE=ep|pp]
(pp: mlx-lm's own even pipeline split, the baseline the bench compares against)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.utils import load_model

from mlxdist.runtime.expert_parallel import expert_parallel, split_experts


def main() -> None:
    model_dir, out, prompt, max_tokens = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    # one rank runs without a hostfile: the group of this process alone
    group = mx.distributed.init(backend="ring", strict="MLX_HOSTFILE" in os.environ)
    rank, size = group.rank(), group.size()
    model, config = load_model(Path(model_dir))
    mode = sys.argv[5] if len(sys.argv) > 5 else "ep"
    if mode == "ep":
        owned = split_experts(config["n_routed_experts"], size)[rank]
        patched = expert_parallel(model, owned, group)
    else:  # mlx-lm's own pipeline: an even split of the layers, the baseline
        owned, patched = list(range(config["n_routed_experts"])), 0
        model.model.pipeline(group)
        mx.eval(model.parameters())
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
    if rank == 0:
        out.write_text(json.dumps({"allsum_s": allsum_s, "tokens": tokens, "logprobs0": first_logits, "ranks": size,
                                   "patched_blocks": patched, "owned": owned, "ranks_agree": agree,
                                   "step_s": times}))


if __name__ == "__main__":
    main()
