"""Expert-parallel MoE blocks: each rank holds some routed experts, computes the
selected experts it holds, and one `all_sum` over the group adds the ranks' partial
outputs, so every rank ends with the single-device block output.

Works with MLX's ring and jaccl backends, which offer `all_sum` over the whole group but
no sub-groups and no all-to-all: the whole group is one expert-parallel stage (see
docs/placement.md). Routing (the gate) runs replicated on every rank; tokens are never
moved, only the (batch, length, hidden) partial outputs are summed.

    from mlxdist.runtime.expert_parallel import expert_parallel
    n = expert_parallel(model, owned=range(0, 128), group=mx.distributed.init(backend="ring"))

Supported blocks: mlx-lm's deepseek_v3 `DeepseekV3MoE` (shared experts are added on one
rank only, `shared_rank`) and qwen3_moe `Qwen3MoeSparseMoeBlock`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlxdist.placement.plan import Plan


def _route_deepseek(block: nn.Module, x: mx.array) -> tuple[mx.array, mx.array]:
    return block.gate(x)


def _route_qwen3_moe(block: nn.Module, x: mx.array) -> tuple[mx.array, mx.array]:
    # the same arithmetic as Qwen3MoeSparseMoeBlock.__call__ in mlx-lm
    gates = mx.softmax(block.gate(x), axis=-1, precise=True)
    k = block._top_k
    inds = mx.stop_gradient(mx.argpartition(gates, kth=-k, axis=-1)[..., -k:])
    scores = mx.take_along_axis(gates, inds, axis=-1)
    if block._norm_topk_prob:
        scores /= mx.sum(scores, axis=-1, keepdims=True)
    return inds, scores


def _router_of(block: nn.Module):
    name = type(block).__name__
    if name == "DeepseekV3MoE":
        return _route_deepseek
    if name == "Qwen3MoeSparseMoeBlock":
        return _route_qwen3_moe
    return None


def is_moe_block(module: nn.Module) -> bool:
    return _router_of(module) is not None


def _keep_experts(switch_mlp: nn.Module, owned: mx.array) -> None:
    """Drop every expert but `owned` from a SwitchGLU (quantized or not), in place."""
    for proj in (switch_mlp.gate_proj, switch_mlp.up_proj, switch_mlp.down_proj):
        for key in ("weight", "scales", "biases", "bias"):
            if key in proj and proj[key] is not None:
                proj[key] = mx.take(proj[key], owned, axis=0)


def routed_experts(block: nn.Module) -> int:
    """How many routed experts the block's router chooses from (its gate's outputs): the
    global expert ids, whatever rows this rank's stacked experts hold."""
    return int(block.gate.weight.shape[0])


class ExpertParallelMoE(nn.Module):
    """Stands in for an mlx-lm MoE block on one rank of an expert-parallel group.

    The block's stacked experts hold either every routed expert (a whole checkpoint or
    stage: the rows of `owned` are cut out here) or exactly `owned`, row i being expert
    owned[i] (a node's part of an expert-parallel conversion, docs/shard-format.md).

    `combine` adds the members' partial outputs; default `all_sum` over `group` (a stage
    over the whole group). A stage over some of the ranks passes chain.py's `chain_sum`."""

    def __init__(self, block: nn.Module, owned: Sequence[int], group: mx.distributed.Group,
                 holds_shared: bool, combine: Callable[[mx.array], mx.array] | None = None):
        super().__init__()
        router = _router_of(block)
        if router is None:
            raise TypeError(f"{type(block).__name__} is not a supported MoE block")
        n_experts = routed_experts(block)
        owned = [int(e) for e in owned]
        if len(set(owned)) != len(owned):
            raise ValueError(f"expert ids must be distinct; got {owned}")
        if owned and not (0 <= min(owned) and max(owned) < n_experts):
            raise ValueError(f"expert ids must lie in [0, {n_experts}); got {min(owned)}..{max(owned)}")
        rows = block.switch_mlp.gate_proj.num_experts
        if rows not in (n_experts, len(owned)):
            raise ValueError(f"the stacked experts hold {rows} rows: neither all {n_experts} experts "
                             f"nor the {len(owned)} this rank owns")
        self.gate = block.gate
        self.switch_mlp = block.switch_mlp
        self.shared_experts = getattr(block, "shared_experts", None) if holds_shared else None
        self._owned = owned
        self._route = router
        # what qwen3_moe's routing reads besides the gate (plain numbers, not parameters)
        self._top_k = getattr(block, "top_k", None)
        self._norm_topk_prob = getattr(block, "norm_topk_prob", None)
        self._combine = combine or (lambda y: mx.distributed.all_sum(y, group=group))
        if owned and rows == n_experts:
            _keep_experts(self.switch_mlp, mx.array(owned))
        # global expert id -> local row, -1 where another rank holds it
        local = [-1] * n_experts
        for i, e in enumerate(owned):
            local[e] = i
        self._local = mx.array(local, dtype=mx.int32)

    @property
    def owned(self) -> list[int]:
        return list(self._owned)

    def __call__(self, x: mx.array) -> mx.array:
        inds, scores = self._route(self, x)
        local = self._local[inds]
        mine = local >= 0
        if self._owned:
            # experts held elsewhere are computed as local expert 0 and weighted by zero
            y = self.switch_mlp(x, mx.where(mine, local, 0))
            w = mx.where(mine, scores, mx.zeros_like(scores))
            y = (y * w[..., None]).sum(axis=-2).astype(y.dtype)
        else:
            y = mx.zeros_like(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return self._combine(y)


def split_experts(n_experts: int, ranks: int, weights: Sequence[float] | None = None) -> list[list[int]]:
    """Contiguous expert ranges per rank, in proportion to `weights` (default: equal)."""
    weights = list(weights or [1.0] * ranks)
    total = sum(weights)
    bounds, acc = [0], 0.0
    for w in weights:
        acc += w
        bounds.append(round(n_experts * acc / total))
    return [list(range(bounds[i], bounds[i + 1])) for i in range(ranks)]


def expert_parallel(model: nn.Module, owned: Iterable[int], group: mx.distributed.Group,
                    shared_rank: int = 0, layers: range | None = None,
                    combine: Callable[[mx.array], mx.array] | None = None) -> int:
    """Replace every MoE block of `model` (an mlx-lm model) in `layers` (default: all) by
    an ExpertParallelMoE holding experts `owned`, combining with `combine` (default:
    all_sum over `group`). Returns how many blocks were replaced."""
    owned = list(owned)
    count = 0
    for i, layer in enumerate(model.layers):
        if layers is not None and i not in layers:
            continue
        block = getattr(layer, "mlp", None)
        if block is None or not is_moe_block(block):
            continue
        block.sharding_group = None
        layer.mlp = ExpertParallelMoE(block, owned, group, holds_shared=group.rank() == shared_rank,
                                      combine=combine)
        count += 1
    return count


def owned_experts_from_plan(plan: Plan, node: str) -> dict[tuple[int, int], list[int]]:
    """{(start, end): expert ids} of `node` in each expert-parallel stage of `plan`."""
    return {s.layers: list(s.experts_of(node)) for s in plan.stages
            if s.expert_parallel and node in s.nodes}
