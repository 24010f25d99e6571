"""Pure placement: (model, cluster, context x concurrency) -> the fastest plan that fits.

Candidates, all priced by `cost.py`:
- a pipeline over the k fastest nodes (k = 1..N), layers split in proportion to
  bandwidth, to usable memory (exo's rule), or filling the fastest nodes first (on
  identical nodes only the even split); a split that overflows a node is repaired by
  moving layers to the nodes with the most room;
- for MoE models, the whole model as one expert-parallel stage over the k fastest nodes:
  attention, dense layers, shared experts, embedding and head on every node, each node
  holding a contiguous range of routed experts (in proportion to bandwidth, capped by
  room), one all_sum per MoE layer (see docs/placement.md for why the whole group).
The objective is the per-stream time per token at the requested concurrency; ties go
to the candidate listed first (fewer nodes, then the bandwidth split).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mlxdist.errors import UserError, plural
from mlxdist.placement.cost import CostParams, Profile, ep_times, pipeline_times
from mlxdist.placement.hardware import GB, Cluster, NodeSpec
from mlxdist.placement.model import ModelSpec
from mlxdist.placement.plan import Estimate, NodeLoad, Plan, Stage

HEADROOM = 0.05  # of each node's usable memory, left for activations and fragmentation


@dataclass(frozen=True)
class Request:
    context: int = 32768
    concurrency: int = 4
    headroom: float = HEADROOM
    allow_expert_parallel: bool = True
    strategy: str = "auto"  # auto | pipeline | expert-parallel


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
    counts = list(counts)

    def overflow(i: int, cs: list[int]) -> int:
        a, b = _ranges(cs)[i]
        used = p.stage_weights(a, b) + p.kv_bytes(a, b, req.context, req.concurrency) if b > a else 0
        return used - budget(nodes[i], req.headroom)

    for _ in range(p.L * len(nodes) + 1):
        over = [i for i in range(len(nodes)) if counts[i] and overflow(i, counts) > 0]
        if not over:
            return counts if all(counts) else None
        i = over[0]
        best, best_room = None, None
        for j in range(len(nodes)):
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
    counts = _largest_remainder(p.E, [n.bandwidth for n in nodes])
    for _ in range(p.E * len(nodes)):  # move experts off nodes without room
        over = [i for i in range(len(nodes)) if counts[i] > room[i]]
        if not over:
            break
        i = over[0]
        j = max((j for j in range(len(nodes)) if counts[j] < room[j]), key=lambda j: room[j] - counts[j])
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
    group = tuple(n.name for n in nodes)
    single, cyc, pre, comm, busy = ep_times(p, cluster, cp, group, dict(zip(group, owned)),
                                            req.context, req.concurrency)
    experts, start = [], 0
    for n, c in zip(nodes, owned):
        experts.append((n.name, tuple(range(start, start + c))))
        start += c
    loads = tuple(
        NodeLoad(n.name, n.chip, p.ep_weights(0, p.L, c), p.kv_bytes(0, p.L, req.context, req.concurrency),
                 n.usable_bytes, t * 1e3, ((0, p.L),), c)
        for n, c, t in zip(nodes, owned, busy))
    return Plan(model.name, model.model_type, model.quant.bits, req.context, req.concurrency,
                "expert-parallel", group, (Stage((0, p.L), group, tuple(experts)),), loads,
                Estimate(single * 1e3, cyc * 1e3, req.concurrency / cyc, pre, comm * 1e3), reason,
                cluster.default_link)


def candidates(model: ModelSpec, cluster: Cluster, req: Request, cp: CostParams = CostParams()) -> list[Plan]:
    """Every plan that fits, in tie-break order."""
    p = Profile(model)
    out: list[Plan] = []
    for nodes in _candidate_sets(cluster):
        if len(nodes) > p.L:
            break
        if req.strategy in ("auto", "pipeline"):
            splits = [
                ("layers in proportion to memory bandwidth", _largest_remainder(p.L, [n.bandwidth for n in nodes])),
                ("layers in proportion to usable memory", _largest_remainder(p.L, [n.usable_bytes for n in nodes])),
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
                out.append(make_pipeline(model, cluster, nodes, fitted, req, cp, p, why))
        if (req.strategy in ("auto", "expert-parallel") and req.allow_expert_parallel and p.E
                and len(nodes) > 1):
            owned = _ep_experts(p, nodes, req)
            if owned is not None:
                out.append(make_expert_parallel(model, cluster, nodes, owned, req, cp, p,
                                                "routed experts in proportion to bandwidth"))
    return out


def best_plan(model: ModelSpec, cluster: Cluster, req: Request, cp: CostParams = CostParams()) -> Plan | None:
    best: Plan | None = None
    considered = candidates(model, cluster, req, cp)
    for plan in considered:
        if best is None or plan.estimate.step_ms_at_concurrency < best.estimate.step_ms_at_concurrency * (1 - 1e-9):
            best = plan
    if best is None:
        return None
    others = sorted(considered, key=lambda x: x.estimate.step_ms_at_concurrency)
    runner = next((x for x in others if x is not best), None)
    fastest = ("the only plan that fits" if len(considered) == 1
               else f"the fastest of {len(considered)} plans that fit")
    why = (f"{best.strategy} over {plural(len(best.group), 'node')}, {best.reason}: "
           f"{best.estimate.step_ms_at_concurrency:.1f} ms/token per stream at concurrency {req.concurrency}, "
           f"{fastest}")
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
    return bool(candidates(model, cluster, req, CostParams()))


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
