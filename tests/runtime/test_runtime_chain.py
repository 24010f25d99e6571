"""Sums chained over neighbour links (mlxdist/runtime/chain.py) and a mixed plan built on
them, on real ring ranks on 127.0.0.1: rank 0 a pipeline stage over layers [0, K), ranks
1 and 2 one expert-parallel stage over [K, L) whose MoE layers combine with `chain_sum`.

This file is also the ranks' program (tools/bench_chain.py times the same plans):
    python test_runtime_chain.py sum FIRST LAST SCHEME OUT_DIR
    python test_runtime_chain.py model PLAN MODEL_DIR OUT_DIR PROMPT(comma) MAX_TOKENS [SCHEME]
PLAN: mixed (the above), pipeline (3 stages [0, K), [K, K+1), [K+1, L)), ep (the whole
model expert-parallel over all 3 ranks, all_sum). Every rank writes rank{r}.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from tests.placement.ranks import run_ranks  # noqa: E402

K = 2  # the tiny deepseek's layers: 0 dense, 1..3 MoE; the EP stage gets 2 and 3
PROMPT = [1, 5, 9, 33, 100, 7, 42]
MAX_TOKENS = 6
SHAPES = [(3,), (2, 1, 64), (1, 4, 7168)]


def part(rank: int, call: int, shape: tuple[int, ...]):
    """Rank `rank`'s input to the `call`-th sum: random, of every sign and magnitude."""
    import numpy as np

    rng = np.random.default_rng(1000 * rank + call)
    return (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)).astype(np.float32)


# the ranks' program

def sum_rank(first: int, last: int, scheme: str, out: Path) -> None:
    """Members sum every SHAPES part, lazily one after another: each call's input waits on
    the previous result (as a model's layers do), and one eval runs them all."""
    import mlx.core as mx
    import numpy as np

    from mlxdist.runtime.chain import chain_sum

    group = mx.distributed.init(backend="ring")
    rank = group.rank()
    result = {"rank": rank}
    if first <= rank <= last:
        sums, prev = [], mx.array(0.0)
        for call, shape in enumerate(SHAPES):
            x = mx.array(part(rank, call, shape)) + 0 * prev.reshape(-1)[0]
            prev = chain_sum(x, group, first, last, scheme)
            sums.append(prev)
        mx.eval(sums)
        result["sums"] = [np.array(s).tobytes().hex() for s in sums]
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def _layers(model, h, caches, a: int, b: int):
    """Layers [a, b) of an mlx-lm model over hidden states h, as its own __call__ runs them."""
    from mlx_lm.models.base import create_attention_mask

    mask = create_attention_mask(h, caches[a], return_array=True)
    for layer, c in zip(model.model.layers[a:b], caches[a:b]):
        h = layer(h, mask, cache=c)
    return h


def _head(model, h):
    import mlx.core as mx

    logits = model.lm_head(model.model.norm(h[:, -1:]))[:, 0]
    return mx.argmax(logits, axis=-1).astype(mx.int32), logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def model_rank(plan: str, model_dir: Path, out: Path, prompt: list[int], max_tokens: int, scheme: str) -> None:
    """Greedy generation under `plan` on 3 ranks; the rank that samples writes the tokens,
    the first step's log-probabilities and the time of each step."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    from mlxdist.runtime.chain import chain_expert_parallel
    from mlxdist.runtime.expert_parallel import expert_parallel, split_experts

    group = mx.distributed.init(backend="ring")
    rank, size = group.rank(), group.size()
    model, config = load_model(model_dir)
    n_layers, n_experts, dim = config["num_hidden_layers"], config["n_routed_experts"], config["hidden_size"]
    if plan == "mixed":
        if rank > 0:
            chain_expert_parallel(model, split_experts(n_experts, size - 1)[rank - 1], group, 1, size - 1,
                                  layers=range(K, n_layers), scheme=scheme)
        bounds = {0: (0, K), 1: (K, n_layers), 2: (K, n_layers)}[rank]
    elif plan == "pipeline":
        bounds = [(0, K), (K, K + 1), (K + 1, n_layers)][rank]
    else:
        expert_parallel(model, split_experts(n_experts, size)[rank], group)
        bounds = (0, n_layers)
    mx.eval(model.parameters())
    caches = make_prompt_cache(model)
    samples = plan == "ep" or rank == size - 1
    tokens, logprobs, step_s = [], None, []
    tok = mx.array([prompt], dtype=mx.int32)
    for step in range(max_tokens):
        t0 = time.perf_counter()
        shape = (1, tok.shape[1], dim)
        if plan == "ep" or rank == 0:
            h = _layers(model, model.model.embed_tokens(tok), caches, *bounds)
        else:
            h = mx.distributed.recv(shape, mx.float32, rank - 1, group=group)
            if plan == "mixed" and rank < size - 1:  # the EP stage's other member needs it too
                h = mx.depends(h, mx.distributed.send(h, rank + 1, group=group))
            h = _layers(model, h, caches, *bounds)
        if samples:
            nxt, lp = _head(model, h)
            if plan != "ep":
                nxt = mx.depends(nxt, mx.distributed.send(nxt, 0, group=group))
            mx.eval(nxt, lp)
            tokens.append(int(nxt.item()))
            logprobs = logprobs or lp[0].tolist()
        elif rank == 0:  # a pipeline stage: hand on h, wait for the token from the last rank
            sent = mx.distributed.send(h, 1, group=group)
            sent, nxt = mx.depends([sent, mx.distributed.recv((1,), mx.int32, size - 1, group=group)], [sent])
            mx.eval(nxt)
        elif plan == "pipeline":
            mx.eval(mx.distributed.send(h, rank + 1, group=group))
        else:  # the mixed plan's first EP member: its layers fill its caches, no head
            mx.eval(h)
        step_s.append(time.perf_counter() - t0)
        tok = nxt.reshape(1, 1) if plan == "ep" or rank in (0, size - 1) else mx.array([[0]], dtype=mx.int32)
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "tokens": tokens, "logprobs0": logprobs, "step_s": step_s}))


# the tests

def _check(res: list[tuple[int, str]]) -> None:
    assert all(code == 0 for code, _ in res), "\n".join(err for _, err in res)


@pytest.mark.parametrize("scheme", ["relay", "reduce"])
@pytest.mark.parametrize("ranks,first,last", [(3, 0, 2), (4, 1, 3), (3, 1, 2)])
def test_chain_sum_equals_numpy_on_every_member(tmp_path, scheme, ranks, first, last):
    """Members get the float64 sum of the parts within float32 rounding, the same bits on
    every member; rank 0 of 4 takes no part in a sum over 1..3."""
    import numpy as np

    _check(run_ranks(ranks, [__file__, "sum", str(first), str(last), scheme, str(tmp_path)], timeout=120))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    members = [g for g in got if first <= g["rank"] <= last]
    assert all("sums" not in g for g in got if g not in members)
    prev = np.float32(0)
    for call, shape in enumerate(SHAPES):
        bits = {g["sums"][call] for g in members}
        assert len(bits) == 1, f"members disagree on sum {call}"
        y = np.frombuffer(bytes.fromhex(bits.pop()), np.float32).reshape(shape)
        parts = [part(r, call, shape) for r in range(first, last + 1)]
        want = np.sum(np.array(parts, np.float64), axis=0)
        scale = np.sum(np.abs(np.array(parts, np.float64)), axis=0)
        assert np.all(np.abs(y - want) <= 4 * np.finfo(np.float32).eps * scale + 1e-30)
        prev = y.reshape(-1)[0]
    assert np.isfinite(prev)


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory) -> Path:
    from tests.placement.tiny import make_tiny_deepseek

    return make_tiny_deepseek(tmp_path_factory.mktemp("chain") / "deepseek")


def reference(model_dir: Path) -> tuple[list[int], list[float]]:
    """mlx-lm's own greedy generation on one process, and its first log-probabilities."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    steps = list(generate_step(mx.array(PROMPT), model, max_tokens=MAX_TOKENS,
                               sampler=lambda lp: mx.argmax(lp, axis=-1)))
    return [int(t) for t, _ in steps], steps[0][1].tolist()


@pytest.mark.parametrize("plan,scheme", [("mixed", "relay"), ("mixed", "reduce"), ("pipeline", "-"), ("ep", "-")])
def test_plans_match_mlx_lm(tiny_deepseek, tmp_path, plan, scheme):
    """Greedy tokens equal mlx-lm's single process and the first log-probabilities agree
    within 1e-4, for the mixed plan and for the two plans the bench compares it with."""
    import numpy as np

    tokens, logprobs = reference(tiny_deepseek)
    argv = [__file__, "model", plan, str(tiny_deepseek), str(tmp_path), ",".join(map(str, PROMPT)),
            str(MAX_TOKENS), scheme]
    _check(run_ranks(3, argv, timeout=180))
    got = json.loads((tmp_path / "rank2.json").read_text())
    assert got["tokens"] == tokens
    assert np.max(np.abs(np.array(got["logprobs0"]) - np.array(logprobs))) < 1e-4


if __name__ == "__main__":
    if sys.argv[1] == "sum":
        sum_rank(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
    else:
        model_rank(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), [int(t) for t in sys.argv[5].split(",")],
                   int(sys.argv[6]), sys.argv[7] if len(sys.argv) > 7 else "relay")
