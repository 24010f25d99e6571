"""Pure placement: (model, cluster, context x concurrency) -> the fastest plan that fits.

Candidates, all priced by `cost.py`:
- a pipeline over the k fastest nodes (k = 1..N), layers split in proportion to
  bandwidth, to usable memory (exo's rule), or filling the fastest nodes first (on
  identical nodes only the even split); a split that overflows a node is repaired by
  moving layers to the nodes with the most room;
- for MoE models, the whole model as one expert-parallel stage over the k fastest nodes:
  attention, dense layers, shared experts, embedding and head on every node, each node
  holding a contiguous range of routed experts (in proportion to bandwidth, capped by
  room), one all_sum per MoE layer (see docs/placement.md for why the whole group);
- for MoE models, mixed plans over the k fastest nodes (k >= 3): a pipeline one of whose
  stages is expert-parallel over consecutive ring ranks after rank 0 (every choice of
  those ranks), its MoE combine a chained sum over the neighbour links (`mixed_times`);
  layers split in proportion to speed or to room (or the pipeline stages filled first),
  repaired like a pipeline's, the stage's experts in proportion to bandwidth within each
  member's room.
The objective is the per-stream time per token at the requested concurrency; ties go
to the candidate listed first (fewer nodes, then the bandwidth split).

`plan_stages` answers the serving question: a conversion's stages are cut already, so
only which node runs each stage is chosen (the same cost model, the same budgets); it is
what `mlxdist serve --nodes` places with, first and after a node loss. `plan_expert_parts`
does the same for an expert-parallel conversion's per-node parts after a node loss: the
lost node's parts move whole to nodes with room.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Sequence

from mlxdist.errors import UserError, plural
from mlxdist.placement.cost import (
    CostParams, Profile, ceil_div, chain_time, ep_times, mixed_times, pipeline_times, position,
)
from mlxdist.placement.specs import GB, LINK_PRESETS, GiB, Cluster, LinkSpec, NodeSpec
from mlxdist.placement.model import ModelSpec
from mlxdist.placement.plan import Estimate, NodeLoad, Plan, Stage, rank_words

HEADROOM = 0.05  # of each node's usable memory, left for activations and fragmentation


@dataclass(frozen=True)
class Request:
    context: int = 32768
    concurrency: int = 4
    headroom: float = HEADROOM
    allow_expert_parallel: bool = True  # expert-parallel and mixed plans
    strategy: str = "auto"  # one of REQUEST_STRATEGIES


REQUEST_STRATEGIES = ("auto", "pipeline", "expert-parallel", "mixed")  # `mlxdist plan --strategy`


def budget(node: NodeSpec, headroom: float) -> int:
    return int(node.usable_bytes * (1.0 - headroom))


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    s = sum(weights)
    raw = [total * w / s for w in weights]
    counts = [int(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    out, a = [], 0
    for c in counts:
        out.append((a, a + c))
        a += c
    return out


def _pipeline_fit(p: Profile, nodes: list[NodeSpec], counts: list[int], req: Request) -> list[int] | None:
    """Move layers off overfull stages onto the stages with the most room; None if stuck."""

    def overflow(i: int, cs: list[int]) -> int:
        a, b = _ranges(cs)[i]
        used = p.stage_weights(a, b) + p.kv_bytes(a, b, req.context, req.concurrency) if b > a else 0
        return used - budget(nodes[i], req.headroom)

    return _fit_counts(counts, overflow, p.L * len(nodes) + 1)


def _fit_counts(counts: list[int], overflow, rounds: int) -> list[int] | None:
    """Move layers, one at a time, from the first overfull stage to the stage with the
    most room after taking it (`overflow(i, counts)`: bytes stage i lacks, negative: its
    room); None if stuck or a stage is left empty."""
    counts = list(counts)
    n = len(counts)
    for _ in range(rounds):
        over = [i for i in range(n) if counts[i] and overflow(i, counts) > 0]
        if not over:
            return counts if all(counts) else None
        i = over[0]
        best, best_room = None, None
        for j in range(n):
            if j == i:
                continue
            trial = list(counts)
            trial[i] -= 1
            trial[j] += 1
            room = -overflow(j, trial)
            if room >= 0 and (best_room is None or room > best_room):
                best, best_room = j, room
        if best is None:
            return None
        counts[i] -= 1
        counts[best] += 1
    return None


def _fill_fastest(p: Profile, nodes: list[NodeSpec], req: Request) -> list[int]:
    """As many layers as fit on each node, fastest first (positions taken as average)."""
    per_layer = (p.stage_weights(0, p.L) + p.kv_bytes(0, p.L, req.context, req.concurrency)) / p.L
    order = sorted(range(len(nodes)), key=lambda i: -nodes[i].bandwidth)
    counts, left = [0] * len(nodes), p.L
    for i in order:
        counts[i] = min(left, max(1, int(budget(nodes[i], req.headroom) // per_layer)))
        left -= counts[i]
    counts[order[-1]] += left
    return counts


def _ep_experts(p: Profile, nodes: list[NodeSpec], req: Request) -> list[int] | None:
    room = []
    for n in nodes:
        rep = p.ep_weights(0, p.L, 0) + p.kv_bytes(0, p.L, req.context, req.concurrency)
        per_expert = p.s(p.xbytes, 0, p.L)
        room.append((budget(n, req.headroom) - rep) // per_expert if per_expert else 0)
    if min(room) < 1 or sum(room) < p.E:
        return None
    return _fit_experts(_largest_remainder(p.E, [n.bandwidth for n in nodes]), room, p.E)


def _fit_experts(counts: list[int], room: list[int], experts: int) -> list[int] | None:
    """`counts` with experts moved off members without room to the one with most room
    left; None if that does not make every count fit (and be at least one)."""
    for _ in range(experts * len(counts)):
        over = [i for i in range(len(counts)) if counts[i] > room[i]]
        if not over:
            break
        i = over[0]
        j = max((j for j in range(len(counts)) if counts[j] < room[j]), key=lambda j: room[j] - counts[j])
        counts[i] -= 1
        counts[j] += 1
    return counts if all(0 < c <= r for c, r in zip(counts, room)) else None


def _candidate_sets(cluster: Cluster) -> list[list[NodeSpec]]:
    ranked = sorted(cluster.nodes, key=lambda n: (-n.bandwidth, -n.usable_bytes))
    sets = []
    for k in range(1, len(ranked) + 1):
        chosen = {n.name for n in ranked[:k]}
        sets.append([n for n in cluster.nodes if n.name in chosen])  # keep the user's ring order
    return sets


def make_pipeline(model: ModelSpec, cluster: Cluster, nodes: list[NodeSpec], counts: list[int],
                  req: Request, cp: CostParams, p: Profile, reason: str) -> Plan:
    rng = _ranges(counts)
    stages = [(n.name, a, b) for n, (a, b) in zip(nodes, rng)]
    single, cyc, pre, comm, busy = pipeline_times(p, cluster, cp, stages, req.context, req.concurrency)
    loads = tuple(
        NodeLoad(n.name, n.chip, p.stage_weights(a, b), p.kv_bytes(a, b, req.context, req.concurrency),
                 n.usable_bytes, t * 1e3, ((a, b),), p.E)
        for n, (a, b), t in zip(nodes, rng, busy))
    return Plan(model.name, model.model_type, model.quant.bits, req.context, req.concurrency,
                "single" if len(nodes) == 1 else "pipeline", tuple(n.name for n in nodes),
                tuple(Stage((a, b), (n.name,)) for n, (a, b) in zip(nodes, rng)), loads,
                Estimate(single * 1e3, cyc * 1e3, req.concurrency / cyc, pre, comm * 1e3), reason,
                cluster.default_link)


def make_expert_parallel(model: ModelSpec, cluster: Cluster, nodes: list[NodeSpec], owned: list[int],
                         req: Request, cp: CostParams, p: Profile, reason: str) -> Plan:
    """The whole model as one expert-parallel stage over `nodes`, node i holding the next
    `owned[i]` routed experts (contiguous ids)."""
    experts, start = [], 0
    for n, c in zip(nodes, owned):
        experts.append((n.name, tuple(range(start, start + c))))
        start += c
    return expert_parallel_plan(model, cluster, tuple(experts), req, cp, p, reason)


def expert_parallel_plan(model: ModelSpec, cluster: Cluster, experts: tuple[tuple[str, tuple[int, ...]], ...],
                         req: Request, cp: CostParams, p: Profile, reason: str) -> Plan:
    """The plan of one expert-parallel stage over the nodes of `experts` (rank order, each
    with its expert ids in row order), priced by `ep_times`; the shared experts count on
    the first rank only, which runs them for all."""
    group = tuple(n for n, _ in experts)
    owned = {n: len(ids) for n, ids in experts}
    single, cyc, pre, comm, busy = ep_times(p, cluster, cp, group, owned, req.context, req.concurrency)
    kv = p.kv_bytes(0, p.L, req.context, req.concurrency)
    loads = tuple(
        NodeLoad(n, cluster.node(n).chip, p.ep_weights(0, p.L, owned[n], shared=rank == 0), kv,
                 cluster.node(n).usable_bytes, t * 1e3, ((0, p.L),), owned[n])
        for rank, (n, t) in enumerate(zip(group, busy)))
    return Plan(model.name, model.model_type, model.quant.bits, req.context, req.concurrency,
                "expert-parallel", group, (Stage((0, p.L), group, experts),), loads,
                Estimate(single * 1e3, cyc * 1e3, req.concurrency / cyc, pre, comm * 1e3), reason,
                cluster.default_link)


# -- mixed plans: pipeline stages and one expert-parallel stage over consecutive ranks -------


def _member_fixed(p: Profile, a: int, b: int, first: bool, last: bool, req: Request) -> int:
    """What a member of a mixed plan's expert-parallel stage over [a, b) holds before any
    expert (the head, if the stage is last, on its last member only)."""
    return p.member_weights(a, b, 0, shared=first, head=last) + p.kv_bytes(a, b, req.context, req.concurrency)


def _stage_room(p: Profile, members: Sequence[NodeSpec], a: int, b: int, req: Request) -> list[int] | None:
    """How many routed experts (per MoE layer) each member of an expert-parallel stage
    over [a, b) has room for; None without a MoE layer in [a, b)."""
    per_expert = p.s(p.xbytes, a, b)
    if b <= a or not per_expert:
        return None
    return [(budget(n, req.headroom) - _member_fixed(p, a, b, t == 0, t == len(members) - 1, req)) // per_expert
            for t, n in enumerate(members)]


def _stage_experts(p: Profile, members: Sequence[NodeSpec], a: int, b: int, req: Request) -> list[int] | None:
    """Each member's count of routed experts: in proportion to bandwidth, at least one
    each, experts moved off a member without room to the one with most room left; None
    if the members cannot hold every expert once."""
    room = _stage_room(p, members, a, b, req)
    if room is None or min(room) < 1 or sum(room) < p.E or len(members) > p.E:
        return None
    return _fit_experts(_at_least_one(_largest_remainder(p.E, [n.bandwidth for n in members])), room, p.E)


def _mixed_overflow(p: Profile, unit: Sequence[NodeSpec], a: int, b: int, req: Request) -> float:
    """Bytes a stage lacks over layers [a, b) (negative: its room): one node, its layers
    and KV cache; an expert-parallel stage, what the member shortest of room lacks for
    one expert, else the experts no member has room for, else the least of the members'
    spare room and the spare expert room (inf without a MoE layer)."""
    if len(unit) == 1:
        used = p.stage_weights(a, b) + p.kv_bytes(a, b, req.context, req.concurrency) if b > a else 0
        return used - budget(unit[0], req.headroom)
    if b <= a:
        return -min(budget(n, req.headroom) for n in unit)
    room = _stage_room(p, unit, a, b, req)
    if room is None:
        return float("inf")
    x = p.s(p.xbytes, a, b)
    spare = [budget(n, req.headroom) - _member_fixed(p, a, b, t == 0, t == len(unit) - 1, req) - x
             for t, n in enumerate(unit)]
    if min(spare) < 0:
        return -min(spare)
    if sum(room) < p.E:
        return (p.E - sum(room)) * x
    return -min(min(spare), (sum(room) - p.E) * x)


def _mixed_splits(p: Profile, cl: Cluster, units: list[list[NodeSpec]], req: Request,
                  cp: CostParams) -> list[tuple[str, list[int]]]:
    """Layer counts per stage to start from: in proportion to speed (1 / a stage's time
    for an average layer, the expert-parallel stage's experts in proportion to bandwidth),
    in proportion to room (the average layers each stage can hold), and the pipeline
    stages filled first (each node as many average layers as it holds, the rest to the
    expert-parallel stage)."""
    pos = position(req.context, cp)
    act = p.model.activation_bytes_per_token
    avg = (p.stage_weights(0, p.L) - p.ends(0, p.L) + p.kv_bytes(0, p.L, req.context, req.concurrency)) / p.L
    rep = (p.s(p.rep, 0, p.L) + p.kv_bytes(0, p.L, req.context, req.concurrency)) / p.L
    x = p.s(p.xbytes, 0, p.L) / p.L
    speed, room = [], []
    for u in units:
        if len(u) == 1:
            speed.append(p.L / p.busy_time(u[0], cl, cp, 0, p.L, 1, pos))
            room.append(max(budget(u[0], req.headroom) / avg, 1e-9))
            continue
        bw = sum(n.bandwidth for n in u)
        t = max(p.busy_time(n, cl, cp, 0, p.L, 1, pos, owned=p.E * n.bandwidth / bw) for n in u)
        t += p.s(p.n_moe, 0, p.L) * chain_time(cl, tuple(n.name for n in u), act)
        speed.append(p.L / t)
        fits = 0
        for c in range(1, p.L + 1):
            if sum(max(0, int((budget(n, req.headroom) - c * rep) // (c * x))) for n in u) < p.E:
                break
            fits = c
        room.append(max(fits, 1e-9))
    counts = [("layers in proportion to speed", _largest_remainder(p.L, speed)),
              ("layers in proportion to room", _largest_remainder(p.L, room))]
    fill = [max(1, int(budget(u[0], req.headroom) // avg)) if len(u) == 1 else 0 for u in units]
    ep = next(i for i, u in enumerate(units) if len(u) > 1)
    fill[ep] = p.L - sum(fill)  # below one: _at_least_one takes layers back from the largest
    counts.append(("the pipeline stages filled first", fill))
    return [(why, _at_least_one(c)) for why, c in counts]


def _at_least_one(counts: list[int]) -> list[int]:
    """The same total, every stage given at least one layer (taken from the largest)."""
    counts = list(counts)
    for i in range(len(counts)):
        while counts[i] < 1:
            counts[max(range(len(counts)), key=lambda j: counts[j])] -= 1
            counts[i] += 1
    return counts


def _mixed_candidates(p: Profile, cl: Cluster, nodes: list[NodeSpec], req: Request, cp: CostParams
                      ) -> Iterator[tuple[str, tuple[Stage, ...]]]:
    """The mixed layouts over `nodes` (ring order) that fit, one at a time: for every run
    nodes[i:j] of two or more consecutive nodes after the first, a pipeline stage on each
    other node and one expert-parallel stage over the run, each of `_mixed_splits`
    repaired."""
    n = len(nodes)
    seen = set()
    if sum(budget(x, req.headroom) for x in nodes) < p.stage_weights(0, p.L) + p.kv_bytes(0, p.L, req.context,
                                                                                          req.concurrency):
        return  # not even a pipeline's bytes fit (an EP stage holds more: its members repeat attention)
    for i in range(1, n - 1):
        for j in range(i + 2, n + 1):
            units = [[x] for x in nodes[:i]] + [list(nodes[i:j])] + [[x] for x in nodes[j:]]
            if len(units) > p.L:
                continue

            def overflow(u: int, cs: list[int]) -> float:
                a, b = _ranges(cs)[u]
                return _mixed_overflow(p, units[u], a, b, req)

            for why, counts in _mixed_splits(p, cl, units, req, cp):
                fitted = _fit_counts(counts, overflow, p.L * len(units) + 1)
                if fitted is None or (i, j, tuple(fitted)) in seen:
                    continue
                seen.add((i, j, tuple(fitted)))
                stages = []
                for u, (a, b) in zip(units, _ranges(fitted)):
                    if len(u) == 1:
                        stages.append(Stage((a, b), (u[0].name,)))
                        continue
                    owned = _stage_experts(p, u, a, b, req)
                    if owned is None:
                        break
                    ids, start = [], 0
                    for member, c in zip(u, owned):
                        ids.append((member.name, tuple(range(start, start + c))))
                        start += c
                    stages.append(Stage((a, b), tuple(x.name for x in u), tuple(ids)))
                else:
                    yield why, tuple(stages)


def describe_stages(stages: Sequence[Stage]) -> str:
    """A mixed plan in words: "3 stages, stage 1 (layers 3-40) expert-parallel over b+c
    (128/128 experts, chained combine)"."""
    k = next(k for k, s in enumerate(stages) if s.expert_parallel)
    s = stages[k]
    counts = "/".join(str(len(ids)) for _, ids in s.experts)
    a, b = s.layers
    layers = f"layer {a}" if b == a + 1 else f"layers {a}-{b - 1}"
    return (f"{plural(len(stages), 'stage')}, stage {k} ({layers}) expert-parallel over {'+'.join(s.nodes)} "
            f"({counts} experts, chained combine)")


def mixed_plan(model: ModelSpec, cluster: Cluster, stages: Sequence[Stage], req: Request, cp: CostParams,
               p: Profile, reason: str) -> Plan:
    """The plan of `stages` (pipeline stages of one node each and one expert-parallel stage
    over consecutive nodes after the first, in ring order; the group is their nodes in
    stage order), priced by `mixed_times`. A member of the expert-parallel stage holds the
    stage's non-expert weights (the shared experts on its first member only), its experts,
    the head if the stage is last, and the stage's KV cache."""
    spec = [(s.nodes, s.layers[0], s.layers[1], {n: len(ids) for n, ids in s.experts} if s.expert_parallel else None)
            for s in stages]
    single, cyc, pre, comm, busy = mixed_times(p, cluster, cp, spec, req.context, req.concurrency)
    loads = []
    for s, own in zip(stages, busy):
        a, b = s.layers
        kv = p.kv_bytes(a, b, req.context, req.concurrency)
        for t, (name, ms) in enumerate(zip(s.nodes, own)):
            node = cluster.node(name)
            if s.expert_parallel:
                k = len(s.experts_of(name))
                w = p.member_weights(a, b, k, shared=t == 0, head=t == len(s.nodes) - 1)
            else:
                k, w = p.E, p.stage_weights(a, b)
            loads.append(NodeLoad(name, node.chip, w, kv, node.usable_bytes, ms * 1e3, ((a, b),), k))
    return Plan(model.name, model.model_type, model.quant.bits, req.context, req.concurrency, "mixed",
                tuple(n for s in stages for n in s.nodes), tuple(stages), tuple(loads),
                Estimate(single * 1e3, cyc * 1e3, req.concurrency / cyc, pre, comm * 1e3), reason,
                cluster.default_link)


def candidates(model: ModelSpec, cluster: Cluster, req: Request, cp: CostParams = CostParams()) -> list[Plan]:
    """Every plan that fits, in tie-break order."""
    return list(_candidates(model, cluster, req, cp, price=True))


def _candidates(model: ModelSpec, cluster: Cluster, req: Request, cp: CostParams, price: bool
                ) -> Iterator[Plan | None]:
    """The plans that fit, one at a time, in tie-break order; without `price`, None for
    each mixed one (whether anything fits needs no prices)."""
    p = Profile(model)
    if req.strategy not in REQUEST_STRATEGIES:
        raise UserError(f"unknown strategy {req.strategy!r} (choose from {', '.join(REQUEST_STRATEGIES)})")
    for nodes in _candidate_sets(cluster):
        if len(nodes) <= p.L:  # a stage per node (a mixed plan's stages are fewer: it checks its own)
            if req.strategy in ("auto", "pipeline"):
                splits = [
                    ("layers in proportion to memory bandwidth",
                     _largest_remainder(p.L, [n.bandwidth for n in nodes])),
                    ("layers in proportion to usable memory",
                     _largest_remainder(p.L, [n.usable_bytes for n in nodes])),
                    ("fastest nodes filled first", _fill_fastest(p, nodes, req)),
                ]
                if len(nodes) == 1:
                    splits = [("one node holds every layer", [p.L])]
                elif len({(n.bandwidth, n.flops, n.usable_bytes) for n in nodes}) == 1:
                    # identical nodes: the even split (as mlx-lm and exo), by design; the
                    # other splits could only trade the embedding/head imbalance for surprise
                    splits = [("the even split over identical nodes", splits[0][1])]
                seen = set()
                for why, counts in splits:
                    fitted = _pipeline_fit(p, nodes, counts, req)
                    if fitted is None or tuple(fitted) in seen:
                        continue
                    seen.add(tuple(fitted))
                    yield make_pipeline(model, cluster, nodes, fitted, req, cp, p, why)
            if (req.strategy in ("auto", "expert-parallel") and req.allow_expert_parallel and p.E
                    and len(nodes) > 1):
                owned = _ep_experts(p, nodes, req)
                if owned is not None:
                    yield make_expert_parallel(model, cluster, nodes, owned, req, cp, p,
                                               "routed experts in proportion to bandwidth")
        if req.strategy in ("auto", "mixed") and req.allow_expert_parallel and p.E and len(nodes) > 2:
            for why, stages in _mixed_candidates(p, cluster, nodes, req, cp):
                yield (mixed_plan(model, cluster, stages, req, cp, p, f"{describe_stages(stages)}; {why}")
                       if price else None)


def fastest(plans: Sequence[Plan]) -> tuple[Plan, Plan | None]:
    """The fastest plan per stream at the request's concurrency (ties: the first listed)
    and the runner-up, for the reason a plan gives."""
    best = plans[0]
    for x in plans[1:]:
        if x.estimate.step_ms_at_concurrency < best.estimate.step_ms_at_concurrency * (1 - 1e-9):
            best = x
    others = sorted((x for x in plans if x is not best), key=lambda x: x.estimate.step_ms_at_concurrency)
    return best, (others[0] if others else None)


def best_plan(model: ModelSpec, cluster: Cluster, req: Request, cp: CostParams = CostParams()) -> Plan | None:
    considered = candidates(model, cluster, req, cp)
    if not considered:
        return None
    best, runner = fastest(considered)
    fits = ("the only plan that fits" if len(considered) == 1
            else f"the fastest of {len(considered)} plans that fit")
    why = (f"{best.strategy} over {plural(len(best.group), 'node')}, {best.reason}: "
           f"{best.estimate.step_ms_at_concurrency:.1f} ms/token per stream at concurrency {req.concurrency}, "
           f"{fits}")
    if runner is not None:
        why += (f" (next: {runner.strategy} over {plural(len(runner.group), 'node')}, {runner.reason}, "
                f"{runner.estimate.step_ms_at_concurrency:.1f} ms)")
    return replace(best, reason=why)


def plan(model: ModelSpec, cluster: Cluster, req: Request, cp: CostParams = CostParams(),
         describe_model=None) -> Plan:
    """The fastest plan that fits, or a UserError saying what is missing and the
    smallest change that would make it fit. `describe_model(bits)` re-sizes the model at
    other bit widths for the suggestion."""
    if req.context < 1 or req.concurrency < 1:
        raise UserError("--context and --concurrency must be at least 1")
    found = best_plan(model, cluster, req, cp)
    if found is not None:
        return found
    raise UserError(refusal(model, cluster, req, cp, describe_model))


def _fits(model: ModelSpec, cluster: Cluster, req: Request) -> bool:
    return any(True for _ in _candidates(model, cluster, req, CostParams(), price=False))


def refusal(model: ModelSpec, cluster: Cluster, req: Request, cp: CostParams, describe_model=None) -> str:
    p = Profile(model)
    weights = p.stage_weights(0, p.L)
    kv = p.kv_bytes(0, p.L, req.context, req.concurrency)
    avail = sum(budget(n, req.headroom) for n in cluster.nodes)
    fixes = []
    if describe_model is not None:
        for bits in (b for b in (8, 6, 5, 4, 3, 2) if b < model.quant.bits):
            if _fits(describe_model(bits), cluster, req):
                fixes.append(f"--bits {bits}")
                break
    ctx = [c for c in (65536, 32768, 16384, 8192, 4096, 2048, 1024, 512, 256) if c < req.context]
    for c in ctx:
        if _fits(model, cluster, replace(req, context=c)):
            fixes.append(f"--context {c}")
            break
    if req.concurrency > 1 and _fits(model, cluster, replace(req, concurrency=1)):
        for c in range(req.concurrency - 1, 0, -1):
            if _fits(model, cluster, replace(req, concurrency=c)):
                fixes.append(f"--concurrency {c}")
                break
    template = max(cluster.nodes, key=lambda n: n.bandwidth)
    for gb in (16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024, 2048):
        extra = replace(template, name="extra", memory_bytes=gb * GB + template.reserve_bytes)
        if gb * GB + template.reserve_bytes > template.reserve_bytes and _fits(
                model, replace(cluster, nodes=(*cluster.nodes, extra)), req):
            fixes.append(f"another {template.chip} node with {gb} GB usable")
            break
    per_node = ", ".join(f"{n.name} {budget(n, req.headroom) / GB:.1f}" for n in cluster.nodes)
    msg = (f"{model.name} at {model.quant.bits} bits does not fit: it needs {(weights + kv) / GB:.1f} GB "
           f"(weights {weights / GB:.1f} GB + KV cache {kv / GB:.1f} GB for "
           f"{plural(req.context, 'token')} x "
           f"{plural(req.concurrency, 'request')}) but the nodes offer {avail / GB:.1f} GB usable ({per_node}), "
           f"and no layer split fits each node")
    msg += "; it would fit with " + " or ".join(fixes) if fixes else "; no single change makes it fit"
    return msg


# -- fixed stages: a converted model's layer ranges on the nodes at hand ---------------------


def _check_ranges(ranges: Sequence[tuple[int, int]], layers: int) -> None:
    ends = [0, *(b for _, b in ranges)]
    if not ranges or any(a != e or b <= a for (a, b), e in zip(ranges, ends)) or ends[-1] != layers:
        raise UserError(f"stage layer ranges {[list(r) for r in ranges]} do not cut the model's "
                        f"{plural(layers, 'layer')} into consecutive non-empty stages")


def _blocks(order: Sequence[str], n_stages: int) -> list[str]:
    """Stage k on order[k]; with fewer nodes than stages, consecutive stages share a node
    (the first nodes take one more), so a shared node's hops stay inside it."""
    if len(order) >= n_stages:
        return list(order[:n_stages])
    counts = _largest_remainder(n_stages, [1.0] * len(order))
    return [name for name, c in zip(order, counts) for _ in range(c)]


def _room(assign: Sequence[str | None], need: Sequence[int], cap: dict[str, int]) -> dict[str, int]:
    room = dict(cap)
    for k, name in enumerate(assign):
        if name is not None:
            room[name] -= need[k]
    return room


def _roomiest(room: dict[str, int]) -> str:
    """The node with the most room left; ties go to the first in ring order."""
    return max(room, key=lambda n: room[n])


def _repair(assign: Sequence[str], need: Sequence[int], cap: dict[str, int],
            fixed: frozenset[int] = frozenset()) -> tuple[str, ...] | None:
    """Move stages (the last ones first, never a `fixed` one) off overfull nodes, each to
    the node with the most room that can take it; None when some node stays overfull."""
    out = list(assign)
    for _ in range(len(out) * len(cap) + 1):
        room = _room(out, need, cap)
        over = [n for n in cap if room[n] < 0]
        if not over:
            return tuple(out)
        movable = [k for k in range(len(out)) if out[k] == over[0] and k not in fixed]
        if not movable:
            return None
        k = movable[-1]
        others = {n: r for n, r in room.items() if n != over[0]}
        if not others or others[_roomiest(others)] < need[k]:
            return None
        out[k] = _roomiest(others)
    return None


def _greedy(need: Sequence[int], cap: dict[str, int],
            assign: Sequence[str | None] | None = None) -> tuple[list[str | None], int | None]:
    """Place the unplaced stages, largest first, each on the node with the most room left.
    Returns the assignment and the first stage that fitted nowhere (None if all did)."""
    out = list(assign) if assign is not None else [None] * len(need)
    room = _room(out, need, cap)
    for k in sorted((k for k in range(len(out)) if out[k] is None), key=lambda k: (-need[k], k)):
        to = _roomiest(room)
        if room[to] < need[k]:
            return out, k
        out[k], room[to] = to, room[to] - need[k]
    return out, None


def _fixed_times(p: Profile, cl: Cluster, cp: CostParams, stages: list[tuple[str, int, int]],
                 req: Request) -> tuple[float, float, float, float, list[float]]:
    """`pipeline_times`, with a node that runs several stages doing their work one after
    the other: at concurrency, a step takes at least m x the busiest node's share."""
    single, cycle, prefill, comm, busy = pipeline_times(p, cl, cp, stages, req.context, req.concurrency)
    m = min(req.concurrency, len(stages))
    tokens, pos = ceil_div(req.concurrency, m), position(req.context, cp)
    per_node: dict[str, float] = {}
    for i, (name, a, b) in enumerate(stages):
        per_node[name] = per_node.get(name, 0.0) + p.busy_time(
            cl.node(name), cl, cp, a, b, tokens, pos, head=(i == len(stages) - 1))
    return single, max(cycle, m * max(per_node.values())), prefill, comm, busy


def _fixed_plan(model: ModelSpec, cl: Cluster, ranges: Sequence[tuple[int, int]], group: tuple[str, ...],
                weights: Sequence[int], kv: Sequence[int], req: Request, cp: CostParams, p: Profile,
                reason: str) -> Plan:
    stages = [(name, a, b) for name, (a, b) in zip(group, ranges)]
    single, cyc, pre, comm, busy = _fixed_times(p, cl, cp, stages, req)
    loads = []
    for name in dict.fromkeys(group):  # one load per node, in rank order
        ks = [k for k, n in enumerate(group) if n == name]
        node = cl.node(name)
        loads.append(NodeLoad(name, node.chip, sum(weights[k] for k in ks), sum(kv[k] for k in ks),
                              node.usable_bytes, sum(busy[k] for k in ks) * 1e3,
                              tuple(tuple(ranges[k]) for k in ks), p.E))
    return Plan(model.name, model.model_type, model.quant.bits, req.context, req.concurrency,
                "single" if len(set(group)) == 1 else "pipeline", group,
                tuple(Stage(tuple(r), (name,)) for name, r in zip(group, ranges)), tuple(loads),
                Estimate(single * 1e3, cyc * 1e3, req.concurrency / cyc, pre, comm * 1e3), reason,
                cl.default_link)


def _with_self_links(cluster: Cluster) -> Cluster:
    """Hops between two stages on one node stay inside it: a loopback link to itself."""
    bw, lat = LINK_PRESETS["loopback"]
    own = {link.a for link in cluster.links if link.a == link.b}
    extra = tuple(LinkSpec(n.name, n.name, bw, lat) for n in cluster.nodes if n.name not in own)
    return replace(cluster, links=(*cluster.links, *extra))


def plan_stages(model: ModelSpec, cluster: Cluster, ranges: Sequence[tuple[int, int]], req: Request,
                keep: Mapping[int, str] | None = None, stage_bytes: Sequence[int] | None = None,
                cp: CostParams = CostParams()) -> Plan:
    """Place a converted model's stages, whose layer ranges the shards on disk fix, one
    node per stage (a node may run several), and return the fastest assignment that fits
    as a pipeline (or single) `Plan`: `group` is the rank order, stage k runs as rank k.

    A node fits what it runs when the stages' weights (`stage_bytes`, the real bytes on
    disk, or the model's numbers) plus their KV caches for context x concurrency stay
    within its budget. Candidates: with `keep` (stage -> the node it ran on, for a
    re-placement) the kept stages stay and only the others move (to the node with the
    most room, or all to one node, each tried); the cost model picks among those, and
    only when none fits do the fresh candidates below compete (moving a stage costs a
    delivery and a reload, which the cost model does not price). Fresh: the nodes' ring
    order as given, the stages largest first on the node with the most room left, the
    heaviest stages on the fastest nodes. A candidate that overflows a node is repaired
    by moving stages to the nodes with the most room. Ties go to the candidate listed
    first. Nothing fits: a one-line UserError saying how much memory is missing."""
    p = Profile(model)
    _check_ranges(ranges, p.L)
    if req.context < 1 or req.concurrency < 1:
        raise UserError("--context and --concurrency must be at least 1")
    if stage_bytes is not None and len(stage_bytes) != len(ranges):
        raise UserError(f"{plural(len(stage_bytes), 'stage size')} for {plural(len(ranges), 'stage')}")
    weights = list(stage_bytes) if stage_bytes is not None else [p.stage_weights(a, b) for a, b in ranges]
    kv = [p.kv_bytes(a, b, req.context, req.concurrency) for a, b in ranges]
    need = [w + c for w, c in zip(weights, kv)]
    cap = {n.name: budget(n, req.headroom) for n in cluster.nodes}
    names = list(cap)
    S = len(ranges)

    kept: list[tuple[str, tuple[str, ...] | None]] = []
    if keep:
        held = [keep.get(k) if keep.get(k) in cap else None for k in range(S)]
        fixed = frozenset(k for k in range(S) if held[k] is not None)
        greedy, _ = _greedy(need, cap, held)
        kept.append(("stages kept where they ran, the others on the nodes with most room",
                     _repair(greedy, need, cap, fixed) if None not in greedy else None))
        if len(fixed) < S:
            for name in names:
                kept.append((f"stages kept where they ran, the others on {name}",
                             _repair([h or name for h in held], need, cap, fixed)))
    fastest = sorted(names, key=lambda n: -cluster.node(n).bandwidth)
    if len(names) >= S:  # the heaviest stages on the fastest nodes, in rank order
        heavy = sorted(range(S), key=lambda k: (-p.stage_weights(*ranges[k]), k))
        by_speed = [""] * S
        for k, name in zip(heavy, fastest):
            by_speed[k] = name
    else:
        by_speed = _blocks(fastest, S)
    greedy, _ = _greedy(need, cap)
    fresh = [("stages on the nodes in ring order", _repair(_blocks(names, S), need, cap)),
             ("stages largest first on the node with most room", None if None in greedy else tuple(greedy)),
             ("the heaviest stages on the fastest nodes", _repair(by_speed, need, cap))]

    cl = _with_self_links(cluster)
    for pool in ([c for c in kept if c[1] is not None], [c for c in fresh if c[1] is not None]):
        seen: dict[tuple[str, ...], str] = {}
        for why, group in pool:
            seen.setdefault(group, why)  # type: ignore[arg-type]
        plans = [_fixed_plan(model, cl, ranges, g, weights, kv, req, cp, p, why) for g, why in seen.items()]
        if plans:
            return _chosen(plans, req)
    raise UserError(_stages_refusal(model, cluster, ranges, weights, kv, cap, req))


def _chosen(plans: list[Plan], req: Request) -> Plan:
    """The fastest assignment (`fastest`), with why."""
    best, runner = fastest(plans)
    why = (f"{best.reason}: {best.estimate.step_ms_at_concurrency:.1f} ms/token per stream at "
           f"concurrency {req.concurrency}, "
           + ("the only assignment that fits" if len(plans) == 1
              else f"the fastest of {len(plans)} assignments that fit"))
    if runner is not None:
        why += f" (next: {runner.reason}, {runner.estimate.step_ms_at_concurrency:.1f} ms)"
    return replace(best, reason=why)


def _stages_refusal(model: ModelSpec, cluster: Cluster, ranges: Sequence[tuple[int, int]],
                    weights: Sequence[int], kv: Sequence[int], cap: dict[str, int], req: Request) -> str:
    """What is missing, in one line: memory in all, or room for the stage that fits nowhere."""
    need = [w + c for w, c in zip(weights, kv)]
    offer = ", ".join(f"{n} {c / GiB:.2f}" for n, c in cap.items())
    head = (f"{model.name}: its {plural(len(ranges), 'stage')} need {sum(need) / GiB:.2f} GiB (weights "
            f"{sum(weights) / GiB:.2f} GiB + KV cache {sum(kv) / GiB:.2f} GiB for "
            f"{plural(req.context, 'token')} x {plural(req.concurrency, 'request')})")
    total = sum(cap.values())
    if sum(need) > total:
        return (f"{head} but the nodes offer {total / GiB:.2f} GiB ({offer}): "
                f"{(sum(need) - total) / GiB:.2f} GiB missing")
    assign, k = _greedy(need, cap)
    assert k is not None, "the largest-first candidate fits, so this is no refusal"
    room = _room(assign, need, cap)
    most = _roomiest(room)
    a, b = ranges[k]
    return (f"{head}; placed largest first, stage {k} (layers {a}-{b - 1}) needs "
            f"{need[k] / GiB:.2f} GiB but the most room left is {room[most] / GiB:.2f} GiB, on "
            f"{most} ({offer} in all): {(need[k] - room[most]) / GiB:.2f} GiB missing")


# -- fixed expert parts: an expert-parallel conversion's per-node parts on the nodes at hand --


def _ep_group(assign: Sequence[str | None], order: Sequence[str]) -> tuple[str, ...]:
    """The nodes that hold parts, in ring order: the expert-parallel group, rank 0 first."""
    held = set(n for n in assign if n is not None)
    return tuple(n for n in order if n in held)


def _ep_need(p: Profile, parts: Sequence[tuple[str, tuple[int, ...]]], assign: Sequence[str | None],
             order: Sequence[str], kv: int) -> dict[str, int]:
    """Each holder's bytes: every non-expert weight, the experts of all its parts, and the
    KV caches; the shared experts only on rank 0 (as `expert_parallel_plan` counts them)."""
    group = _ep_group(assign, order)
    count = {n: 0 for n in group}
    for (_, ids), n in zip(parts, assign):
        if n is not None:
            count[n] += len(ids)
    return {n: p.ep_weights(0, p.L, count[n], shared=rank == 0) + kv for rank, n in enumerate(group)}


def _ep_place(p: Profile, parts: Sequence[tuple[str, tuple[int, ...]]], assign: Sequence[str | None],
              order: Sequence[str], cap: dict[str, int], kv: int,
              only: str | None = None) -> tuple[tuple[str, ...] | None, int | None]:
    """Give each unplaced part, largest first, to the node (`only`, or any) that has the
    most room left after taking it, every node staying within its budget. Returns the
    assignment (None if a part fitted nowhere) and the first part that fitted nowhere."""
    out = list(assign)
    for i in sorted((i for i, n in enumerate(out) if n is None), key=lambda i: (-len(parts[i][1]), i)):
        best, best_room = None, None
        for name in [only] if only is not None else order:
            trial = out[:i] + [name] + out[i + 1:]
            need = _ep_need(p, parts, trial, order, kv)
            if all(need[n] <= cap[n] for n in need) and (best_room is None or cap[name] - need[name] > best_room):
                best, best_room = name, cap[name] - need[name]
        if best is None:
            return None, i
        out[i] = best
    need = _ep_need(p, parts, out, order, kv)
    if any(need[n] > cap[n] for n in need):  # kept parts alone overflow a node
        return None, None
    return tuple(out), None  # type: ignore[arg-type]


def _parts_plan(model: ModelSpec, cl: Cluster, parts: Sequence[tuple[str, tuple[int, ...]]],
                assign: Sequence[str], req: Request, cp: CostParams, p: Profile, reason: str) -> Plan:
    """The expert-parallel plan of an assignment of parts to nodes: each holder's experts
    are its parts' ids concatenated in part order (its stacked rows, in that order)."""
    group = _ep_group(assign, [n.name for n in cl.nodes])
    experts = tuple((n, tuple(e for (_, ids), m in zip(parts, assign) if m == n for e in ids)) for n in group)
    return expert_parallel_plan(model, cl, experts, req, cp, p, reason)


def plan_expert_parts(model: ModelSpec, cluster: Cluster, parts: Sequence[tuple[str, tuple[int, ...]]],
                      req: Request, keep: Mapping[int, str] | None = None,
                      cp: CostParams = CostParams()) -> Plan:
    """Place an expert-parallel conversion's per-node parts, which the shards on disk fix
    (each: the node it was cut for, its expert ids in row order), on `cluster`'s nodes,
    and return the fastest assignment that fits as an expert-parallel `Plan` over the
    nodes holding parts (ring order), each node's experts its parts' ids concatenated in
    part order. What `serve --nodes` re-places with after a node loss: a part's experts
    exist only in that part, so a lost node's parts must go whole to nodes left.

    `keep` (part -> the node it runs on; default: the node it was cut for) keeps every
    part whose node is in `cluster` where it is; the others (orphans) go, largest first,
    to the node with the most room left, or all to one node, each candidate tried, and
    the cost model (`ep_times`) picks among those. A node fits what it holds when every
    non-expert weight, its parts' experts and the KV caches for context x concurrency stay
    within its budget; the shared experts count on the group's first rank only. Only
    when no candidate fits may kept parts move too (largest first on the most room).
    Nothing fits, or fewer than two nodes would hold parts: a one-line UserError."""
    p = Profile(model)
    if req.context < 1 or req.concurrency < 1:
        raise UserError("--context and --concurrency must be at least 1")
    flat = sorted(e for _, ids in parts for e in ids)
    if len(parts) < 2 or flat != list(range(p.E)) or not all(ids for _, ids in parts):
        raise UserError(f"{model.name}: expert parts must be two or more, together holding each of its "
                        f"{plural(p.E, 'routed expert')} once")
    order = [n.name for n in cluster.nodes]
    cap = {n: budget(cluster.node(n), req.headroom) for n in order}
    kv = p.kv_bytes(0, p.L, req.context, req.concurrency)
    where = dict(keep) if keep is not None else {i: node for i, (node, _) in enumerate(parts)}
    held = [where.get(i) if where.get(i) in cap else None for i in range(len(parts))]

    def tried(pool: list[tuple[str, tuple[str, ...] | None]]) -> list[Plan]:
        seen: dict[tuple[str, ...], str] = {}
        for why, assign in pool:
            if assign is not None and len(_ep_group(assign, order)) >= 2:
                seen.setdefault(assign, why)
        return [_parts_plan(model, cluster, parts, a, req, cp, p, why) for a, why in seen.items()]

    kept = [("parts kept where they ran, the others on the nodes with most room",
             _ep_place(p, parts, held, order, cap, kv)[0])]
    if None in held:
        kept += [(f"parts kept where they ran, the others on {name}",
                  _ep_place(p, parts, held, order, cap, kv, only=name)[0]) for name in order]
    fresh, stuck = _ep_place(p, parts, [None] * len(parts), order, cap, kv)
    for plans in (tried(kept), tried([("parts largest first on the node with most room", fresh)])):
        if plans:
            return _chosen(plans, req)
    if stuck is None:  # everything fits, but only on one node: no group to run expert-parallel
        raise UserError(f"{model.name}: its expert parts fit together only on one node; an expert-parallel "
                        f"stage runs on two or more")
    node, ids = parts[stuck]
    offer = ", ".join(f"{n} {c / GiB:.2f}" for n, c in cap.items())
    raise UserError(f"{model.name}: placed largest first, {node}'s expert part (experts "
                    f"{', '.join(map(str, ids))}) fits on no node beside every non-expert weight and the "
                    f"KV cache for {plural(req.context, 'token')} x {plural(req.concurrency, 'request')} "
                    f"({offer} GiB usable; each node needs {p.ep_weights(0, p.L, 0, shared=False) / GiB:.2f} "
                    f"GiB + {kv / GiB:.2f} GiB of KV cache before any expert, "
                    f"{p.s(p.xbytes, 0, p.L) / GiB:.3f} GiB per expert)")


# -- re-placing a mixed plan after a node loss ----------------------------------------


def replace_mixed(model: ModelSpec, cluster: Cluster, plan: Plan, req: Request, stage_bytes: Sequence[int]) -> Plan:
    """A mixed `plan` (pipeline stages and one expert-parallel stage over some ranks)
    re-placed on `cluster` (ring order; the nodes that answer): the same stages, layers
    and experts per rank, every rank whose node is in `cluster` kept there, each other
    rank moved whole (a member with its part, which holds its experts alone) to a node
    left with room, never to a node already running a member of the same stage (its
    experts are named by node). Candidates: the lost ranks largest first on the node
    with the most room, or all on one node; the cost model (`mixed_times`) picks. A
    node fits what it runs when, by the planner's numbers, the pipeline stages' bytes
    on disk, the members' weights (`member_weights`) and their KV caches for context x
    concurrency stay within its budget. Nothing fits: a one-line UserError."""
    p = Profile(model)
    cl = _self_linked(cluster)
    cap = {n.name: budget(n, req.headroom) for n in cl.nodes}
    # every rank: (stage, member index or None, its node now)
    ranks = [(k, t if st.expert_parallel else None, node)
             for k, st in enumerate(plan.stages) for t, node in enumerate(st.nodes)]

    def need(r: int) -> int:
        k, t, node = ranks[r]
        (a, b), kv = plan.stages[k].layers, p.kv_bytes(*plan.stages[k].layers, req.context, req.concurrency)
        if t is None:
            return stage_bytes[k] + kv
        return p.member_weights(a, b, len(plan.stages[k].experts_of(node)), shared=t == 0,
                                head=t == len(plan.stages[k].nodes) - 1) + kv

    orphans = sorted((r for r, (_, _, node) in enumerate(ranks) if node not in cap), key=lambda r: (-need(r), r))
    if not orphans:
        return plan
    used = {n: 0 for n in cap}
    for r, (_, _, node) in enumerate(ranks):
        if node in cap:
            used[node] += need(r)

    def place(only: str | None) -> dict[int, str] | None:
        assign, load = {r: node for r, (_, _, node) in enumerate(ranks) if node in cap}, dict(used)
        for r in orphans:
            k, t, _ = ranks[r]
            taken = {assign[q] for q in assign if ranks[q][0] == k} if t is not None else set()
            fits = [n for n in ([only] if only else cap) if n not in taken and load[n] + need(r) <= cap[n]]
            if not fits:
                return None
            to = max(fits, key=lambda n: (cap[n] - load[n], -list(cap).index(n)))
            assign[r], load[to] = to, load[to] + need(r)
        return assign

    pool = [("the lost ranks on the nodes with most room", place(None))]
    pool += [(f"the lost ranks on {name}", place(name)) for name in cap]
    seen: dict[tuple[str, ...], str] = {}
    for why, assign in pool:
        if assign is not None:
            seen.setdefault(tuple(assign[r] for r in range(len(ranks))), why)
    if not seen:
        r = orphans[0]
        k, t, node = ranks[r]
        offer = ", ".join(f"{n} {(cap[n] - used[n]) / GiB:.2f}" for n in cap)
        members = [n for n in plan.stages[k].nodes if n in cap] if t is not None else []
        also = f"; {', '.join(members)} {'runs' if len(members) == 1 else 'run'} stage {k} already" if members \
            else ""
        raise UserError(f"{model.name}: {rank_words(plan, r)} needs {need(r) / GiB:.2f} GiB, which no "
                        f"node left has beside what it runs ({offer} GiB free{also})")
    plans = []
    for group, why in seen.items():
        stages, at = [], 0
        for st in plan.stages:
            nodes = group[at:at + len(st.nodes)]
            experts = tuple((n, st.experts_of(old)) for n, old in zip(nodes, st.nodes)) if st.expert_parallel else ()
            stages.append(Stage(st.layers, nodes, experts))
            at += len(st.nodes)
        plans.append(mixed_plan(model, cl, stages, req, CostParams(), p,
                                f"the mixed plan's stages kept, {why}"))
    best, _ = fastest(plans)
    return best


def _self_linked(cluster: Cluster) -> Cluster:
    """`cluster` with a loopback link from each node to itself: two ranks on one node
    (after a re-placement) hand over inside it."""
    own = {link.a for link in cluster.links if link.a == link.b}
    extra = tuple(LinkSpec(n.name, n.name, *LINK_PRESETS["loopback"]) for n in cluster.nodes if n.name not in own)
    return replace(cluster, links=(*cluster.links, *extra))
