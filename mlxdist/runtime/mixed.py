"""A mixed plan: a pipeline one of whose stages is expert-parallel over SOME of the ring's
ranks (docs/placement.md "Mixed plans"), e.g. on 3 ranks rank 0 runs layers [0, k) and
ranks 1-2 run layers [k, L), attention replicated, the routed experts divided.

MLX's ring backend has no sub-groups and reaches only the ring neighbours, so the stage's
members are consecutive ranks (never rank 0, whose coordinator stays a one-rank stage),
and each MoE layer combines the members' partial outputs with `chain.chain_sum`
(scheme "reduce": running sum first -> last member, the total back last -> first).

Every message still goes round the ring, rank r -> r + 1 (pipeline.py). A member that is
not the stage's last one *relays*: it passes each message on unchanged (SETUP, JOIN, ...,
and a FORWARD's input too, so the next member runs the same forward) and runs its layers
without sending their output; the last member behaves like an ordinary stage (sends the
hidden state on, or samples and answers rank 0). On the link member i -> i + 1 a
forward's relayed input precedes that forward's running sums (one stream, queued first);
the totals travel back i + 1 -> i, a direction the pipeline never uses. So every member
keeps the same caches, slots and groups, and only the last one holds samplers.

    from mlxdist.runtime.mixed import layout_from_plan
    config = EngineConfig(stages=layout_from_plan(Plan.load("mixed.json")))
    engine = open_engine(model, config, ranks=3)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import mlx.core as mx

from mlxdist.errors import UserError, plural
from mlxdist.placement.plan import Plan
from mlxdist.runtime.config import EngineConfig, StageLayout
from mlxdist.runtime.stage import LoadedStage, StageSpec, load_stage

SCHEME = "reduce"  # chain_sum's: on the caller's stream, so link order is queue order


@dataclass(frozen=True)
class Members:
    """The ranks first..last of the expert-parallel stage of a mixed plan."""

    first: int
    last: int

    def __contains__(self, rank: int) -> bool:
        return self.first <= rank <= self.last


def members(layout: Sequence[StageLayout]) -> Members:
    """The expert-parallel stage's ranks (its stage holds more than one)."""
    rank = 0
    for s in layout:
        if s.ranks > 1:
            return Members(rank, rank + s.ranks - 1)
        rank += s.ranks
    raise ValueError("the layout has no expert-parallel stage")


def layout_from_plan(plan: Plan) -> tuple[StageLayout, ...]:
    """The stages of a mixed `plan` (one-node stages and one expert-parallel stage over
    some of its nodes) as EngineConfig.stages: ranks in the plan's group (ring) order, each
    member's experts as the plan gives them. UserError for a plan of another shape."""
    ranked = [n for st in plan.stages for n in st.nodes]
    if tuple(ranked) != plan.group:
        raise UserError(f"the plan's group {list(plan.group)} is not its stages' nodes in rank order {ranked}")
    wide = [st for st in plan.stages if st.expert_parallel]
    if len(wide) != 1 or len(plan.stages) < 2:
        raise UserError("a mixed plan is pipeline stages plus one expert-parallel stage over some of the nodes; "
                        f"this plan has {plural(len(plan.stages), 'stage')}, {len(wide)} of them expert-parallel")
    return tuple(StageLayout(st.layers[0], st.layers[1], len(st.nodes),
                             tuple(tuple(st.experts_of(n)) for n in st.nodes) if st.expert_parallel else ())
                 for st in plan.stages)


@dataclass(frozen=True)
class PlanRun:
    """How open_engine runs a plan on local ranks: `ranks`, `split` (a pipeline) and the
    config (expert-parallel, or a mixed plan's stages)."""

    ranks: int
    split: tuple[int, ...] | None
    config: EngineConfig


def plan_run(plan: Plan, config: EngineConfig) -> PlanRun:
    """Any plan from `mlxdist plan --json` on local ranks, one per node: pipeline stages (a
    split), one expert-parallel stage over the whole group, or a mixed plan. One-line
    UserError for an expert-parallel or mixed plan with lock-step hand-offs (`handoff`)."""
    if plan.kind != "pipeline" and config.handoff != "messages":
        raise UserError(f"{'a mixed' if plan.kind == 'mixed' else 'an expert-parallel'} plan runs with --handoff "
                        "messages (its expert-parallel stage combines by collectives of its own)")
    ranks = len(plan.group)
    if plan.kind == "pipeline":
        return PlanRun(ranks, tuple(st.layers[1] - st.layers[0] for st in plan.stages), config)
    if plan.kind == "expert-parallel":
        st = plan.stages[0]
        return PlanRun(ranks, None, replace(config, expert_parallel=True,
                                            experts=tuple(tuple(st.experts_of(n)) for n in st.nodes)))
    return PlanRun(ranks, None, replace(config, stages=layout_from_plan(plan)))


def load_member(model_dir: Path, spec: StageSpec, owned: Sequence[int], group: mx.distributed.Group,
                at: Members, presanitized: bool = False, parts: Sequence[Path] = ()) -> LoadedStage:
    """A member's layers with only its routed experts `owned` (sliced before anything is
    read, or its part holding only them), each MoE block combining over the members by
    `chain_sum`; the shared experts on the first member. Only the last member of a last
    stage keeps the head (the caller's `spec`)."""
    from mlxdist.runtime.chain import chain_expert_parallel

    replaced: list[int] = []
    stage = load_stage(model_dir, spec, presanitized=presanitized, parts=parts,
                       prepare=lambda model: replaced.append(chain_expert_parallel(
                           model.model, owned, group, at.first, at.last, scheme=SCHEME)))
    if not replaced or replaced[0] == 0:
        raise UserError(f"layers [{spec.start}, {spec.end}) hold no MoE layer: an expert-parallel stage needs one")
    return stage


def routed_rows(stage: LoadedStage) -> list[int]:
    """Routed-expert rows held by each MoE layer of a loaded stage (its experts, as held)."""
    from mlxdist.runtime.expert_parallel import ExpertParallelMoE

    return [int(layer.mlp.switch_mlp.gate_proj.weight.shape[0]) for layer in stage.model.model.layers
            if isinstance(getattr(layer, "mlp", None), ExpertParallelMoE)]


def routed_bytes(stage: LoadedStage) -> int:
    """Bytes of the routed experts' arrays a loaded stage holds."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for k, v in tree_flatten(stage.model.parameters()) if ".switch_mlp." in k)


def resident_bytes(stage: LoadedStage) -> int:
    """Bytes of every array a loaded stage holds (its weights, as loaded)."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(stage.model.parameters()))


def describe(rank: int, spec: StageSpec, at: Members, owned: Sequence[int], stage: LoadedStage) -> str:
    """The member's line in its log: layers, members, experts, what it holds of them, and
    all the weight bytes it holds."""
    role = "relays to the next member" if rank < at.last else "samples" if spec.is_last else "sends on"
    return (f"rank {rank}: layers {spec.start}:{spec.end}, expert parallel over ranks {at.first}..{at.last}, "
            f"experts {list(owned)}, routed rows per MoE layer {routed_rows(stage)}, routed bytes "
            f"{routed_bytes(stage)}, {role}, resident bytes {resident_bytes(stage)}")
