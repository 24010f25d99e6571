"""The cost model: bytes read per token over memory bandwidth, plus the links.

Decode on Apple GPUs is memory-bound: a step costs the bytes it reads (weights it
touches + the KV cache it attends over) divided by the bandwidth it achieves, or the
FLOPs over the compute it achieves, whichever is larger, plus a fixed overhead per layer
for kernel launches. Links cost latency + bytes / bandwidth per message; an `all_sum`
over G ranks is a ring all-reduce: 2(G-1) messages of 1/G of the buffer each.
Routing is taken as uniform: a batch of b tokens touches E*(1-(1-k/E)^b) distinct experts
of a layer. Where several ranks share a layer's experts (expert parallel), each one's share
of them varies from step to step, and the slowest sets the pace: a layer is priced at the
expected slowest member (`member_times`: each member's time taken as normal, with the
spread of its distinct-expert count, `expert_spread`), not at the average. Real routing is
also skewed (popular experts), which this does not model, so expert-parallel estimates
stay somewhat optimistic (docs/placement.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

from mlxdist.placement.specs import Cluster, NodeSpec
from mlxdist.placement.model import ModelSpec

KV_STEP = 256  # mlx-lm's KVCache grows in steps of 256 tokens


@dataclass(frozen=True)
class CostParams:
    compute_efficiency: float = 0.4  # fraction of peak FLOPs matmuls reach
    layer_overhead_s: float = 20e-6  # kernel launches etc. per layer per step
    prefill_chunk: int = 512  # tokens per prefill step
    kv_position: float = 0.5  # decode is priced at this fraction of the context


def kv_tokens(context: int) -> int:
    return -(-context // KV_STEP) * KV_STEP


def _prefix(values: list[int]) -> list[int]:
    return [0, *accumulate(values)]


class Profile:
    """Prefix sums over a model's layers, so that any range is priced in O(1)."""

    def __init__(self, model: ModelSpec):
        self.model = model
        ls = model.layers
        self.L = len(ls)
        self.rep = _prefix([x.replicated_bytes for x in ls])
        self.shared = _prefix([x.shared_experts for x in ls])  # part of rep: rank 0's alone in EP
        self.routed = _prefix([x.routed_experts for x in ls])
        self.xbytes = _prefix([x.expert_bytes for x in ls])  # one expert of each MoE layer
        self.kv = _prefix([x.kv_bytes_per_token for x in ls])
        self.rep_params = _prefix([x.params_active - x.experts_per_token * x.expert_params for x in ls])
        self.xparams = _prefix([x.expert_params for x in ls])
        self.attn_flops = _prefix([x.attn_flops_per_position for x in ls])
        self.n_moe = _prefix([1 if x.is_moe else 0 for x in ls])
        moe = [x for x in ls if x.is_moe]
        self.E = moe[0].n_routed if moe else 0
        self.k = moe[0].experts_per_token if moe else 0

    def s(self, prefix: list[int], a: int, b: int) -> int:
        return prefix[b] - prefix[a]

    # -- memory -------------------------------------------------------------------
    def ends(self, a: int, b: int) -> int:
        m = self.model
        return (m.embedding if a == 0 else 0) + (m.head if b == self.L else 0)

    def stage_weights(self, a: int, b: int) -> int:
        return self.s(self.rep, a, b) + self.s(self.routed, a, b) + self.ends(a, b)

    def ep_weights(self, a: int, b: int, owned: int, with_ends: bool = True, shared: bool = True) -> int:
        """An expert-parallel member: every non-expert weight, `owned` experts per layer,
        and (in a whole-model EP stage) the embedding and head, since every rank runs them.
        The shared experts only where `shared`: the group's first rank runs them for all
        (runtime/expert_parallel.py), the others hold none."""
        ends = self.model.embedding + self.model.head if with_ends else 0
        held = self.s(self.rep, a, b) - (0 if shared else self.s(self.shared, a, b))
        return held + owned * self.s(self.xbytes, a, b) + ends

    def member_weights(self, a: int, b: int, owned: int, shared: bool, head: bool = True) -> int:
        """A member of an expert-parallel stage over layers [a, b) (whole-model or in a
        mixed plan): the layers' non-expert weights, `owned` experts per MoE layer, the
        embedding if a == 0, the head if b == L and `head` (a mixed plan's last stage: its
        last member only, the one that samples; every part holds it on disk), the shared
        experts only where `shared` (the stage's first member runs them for all)."""
        held = self.s(self.rep, a, b) - (0 if shared else self.s(self.shared, a, b))
        ends = self.ends(a, b) if head else self.ends(a, b) - (self.model.head if b == self.L else 0)
        return held + owned * self.s(self.xbytes, a, b) + ends

    def kv_bytes(self, a: int, b: int, context: int, concurrency: int) -> int:
        return self.s(self.kv, a, b) * kv_tokens(context) * concurrency

    # -- time ---------------------------------------------------------------------
    def distinct_experts(self, tokens: int, owned: int | None = None) -> float:
        if not self.E:
            return 0.0
        owned = self.E if owned is None else owned
        return owned * (1.0 - (1.0 - self.k / self.E) ** tokens)

    def expert_spread(self, tokens: int, owned: float) -> float:
        """Standard deviation of how many of `owned` experts a batch of `tokens` touches
        (each token picks k distinct experts of E at random): from P(an expert untouched)
        and P(two given experts both untouched)."""
        if not self.E or owned <= 0:
            return 0.0
        E, k = self.E, self.k
        q = (1 - k / E) ** tokens
        q2 = ((E - k) * (E - k - 1) / (E * (E - 1))) ** tokens
        return math.sqrt(max(0.0, owned * q * (1 - q) + owned * (owned - 1) * (q2 - q * q)))

    def busy_time(self, node: NodeSpec, cl: Cluster, cp: CostParams, a: int, b: int, tokens: int,
                  position: int, owned: float | None = None, head: bool = False, experts: float | None = None) -> float:
        """Seconds `node` spends on layers [a, b) for a batch of `tokens`, each attending
        over `position` cached tokens; `owned` = experts it holds (None: all); `experts`:
        the distinct experts per layer it reads (default: the expected number)."""
        if b <= a and not head:
            return 0.0
        touched = self.distinct_experts(tokens, owned) if experts is None else experts
        read = (self.s(self.rep, a, b) + touched * self.s(self.xbytes, a, b)
                + self.s(self.kv, a, b) * position * tokens)
        share = 1.0 if owned is None or not self.E else owned / self.E
        flops = 2 * tokens * (self.s(self.rep_params, a, b) + self.k * share * self.s(self.xparams, a, b))
        flops += tokens * position * self.s(self.attn_flops, a, b)
        if head:
            m = self.model
            read += m.head
            flops += 2 * tokens * m.vocab_size * m.hidden_size
        t_mem = read / (node.bandwidth * cl.efficiency)
        t_flop = flops / (node.flops * cp.compute_efficiency)
        return max(t_mem, t_flop) + (b - a) * cp.layer_overhead_s

    def member_times(self, cl: Cluster, cp: CostParams, members: Sequence[tuple[NodeSpec, float]], a: int, b: int,
                     tokens: int, position: int) -> tuple[float, list[float]]:
        """Layers [a, b) split over expert-parallel `members` (node, experts it owns), for a
        batch of `tokens`: (the expected time of the slowest member, each member's expected
        time). A member's time varies with how many of its experts the batch touches; it
        is taken as normal with that count's spread, and the slowest as the expected
        maximum of those (independent: slightly low, as the counts pull against each other)."""
        mean = [self.busy_time(n, cl, cp, a, b, tokens, position, owned=o) for n, o in members]
        if len(members) == 1:
            return mean[0], mean
        high = [self.busy_time(n, cl, cp, a, b, tokens, position, owned=o,
                               experts=self.distinct_experts(tokens, o) + self.expert_spread(tokens, o))
                for n, o in members]
        return expected_max(mean, [h - m for h, m in zip(high, mean)]), mean


def expected_max(means: Sequence[float], sds: Sequence[float], points: int = 257) -> float:
    """E[max] of independent normal variables N(means[i], sds[i]^2): hi - the integral of
    the product of their CDFs over [lo, hi] (8 standard deviations either side)."""
    if not any(sd > 0 for sd in sds):
        return max(means)
    lo = min(m - 8 * sd for m, sd in zip(means, sds))
    hi = max(m + 8 * sd for m, sd in zip(means, sds))
    step = (hi - lo) / (points - 1)
    area = 0.0
    for i in range(points):
        t = lo + i * step
        cdf = 1.0
        for m, sd in zip(means, sds):
            cdf *= (0.5 * (1 + math.erf((t - m) / (sd * math.sqrt(2))))) if sd > 0 else float(t >= m)
        area += cdf * (0.5 if i in (0, points - 1) else 1.0)
    return hi - area * step


def hop_time(cl: Cluster, a: str, b: str, nbytes: float) -> float:
    link = cl.link(a, b)
    return link.latency_s + nbytes / link.bandwidth


def ring_links(cl: Cluster, group: tuple[str, ...]):
    return [cl.link(group[i], group[(i + 1) % len(group)]) for i in range(len(group))]


def allsum_time(cl: Cluster, group: tuple[str, ...], nbytes: float) -> float:
    """Ring all-reduce over the whole group (what MLX's ring and jaccl backends do)."""
    g = len(group)
    if g < 2:
        return 0.0
    links = ring_links(cl, group)
    alpha = max(x.latency_s for x in links)
    beta = min(x.bandwidth for x in links)
    return 2 * (g - 1) * (alpha + nbytes / (g * beta))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def position(context: int, cp: CostParams) -> int:
    return max(1, int(context * cp.kv_position))


def pipeline_times(p: Profile, cl: Cluster, cp: CostParams, stages: list[tuple[str, int, int]],
                   context: int, concurrency: int) -> tuple[float, float, float, float, list[float]]:
    """(single-stream s/token, per-stream s/token at concurrency, prefill tok/s,
    comm s/token, busy s per step per stage) for a pipeline of (node, start, end)."""
    pos = position(context, cp)
    S = len(stages)
    act = p.model.activation_bytes_per_token
    names = [n for n, _, _ in stages]

    def hops(tokens: int) -> list[float]:
        if S == 1:
            return [0.0]
        # stage i sends to stage i+1; the last one sends the sampled token back to rank 0
        return [hop_time(cl, names[i], names[(i + 1) % S], act * tokens if i < S - 1 else 4 * tokens)
                for i in range(S)]

    def busy(tokens: int, pos_: int) -> list[float]:
        return [p.busy_time(cl.node(n), cl, cp, a, b, tokens, pos_, head=(i == S - 1))
                for i, (n, a, b) in enumerate(stages)]

    b1 = busy(1, pos)
    h1 = hops(1)
    single = sum(b1) + sum(h1)
    m = min(concurrency, S)
    bt = ceil_div(concurrency, m)
    bc, hc = busy(bt, pos), hops(bt)
    cycle = max(sum(bc) + sum(hc), m * max(x + y for x, y in zip(bc, hc)))
    P = cp.prefill_chunk
    bp, hp = busy(P, P // 2), hops(P)
    prefill = P / max(x + y for x, y in zip(bp, hp))
    return single, cycle, prefill, sum(h1), b1


def _layer_key(x) -> tuple:
    return (x.replicated_bytes, x.expert_bytes, x.kv_bytes_per_token, x.params_active, x.experts_per_token,
            x.expert_params, x.attn_flops_per_position)


def ep_times(p: Profile, cl: Cluster, cp: CostParams, group: tuple[str, ...], owned: dict[str, int],
             context: int, concurrency: int) -> tuple[float, float, float, float, list[float]]:
    """The whole model as one expert-parallel stage over `group`: every rank runs every
    layer's attention; each MoE layer ends with one all_sum; each step ends with one more
    all_sum to hand rank 0's sampled token to all ranks."""
    pos = position(context, cp)
    act = p.model.activation_bytes_per_token
    nodes = [cl.node(n) for n in group]
    moe_layers = [i for i in range(p.L) if p.model.layers[i].is_moe]

    def step(tokens: int, pos_: int) -> tuple[float, float, list[float]]:
        # per layer the (expected) slowest rank sets the pace; dense layers run replicated
        total = 0.0
        busy = [0.0] * len(nodes)
        cache: dict[tuple, tuple[float, list[float]]] = {}
        for i in range(p.L):
            key = _layer_key(p.model.layers[i])
            if key not in cache:
                cache[key] = p.member_times(cl, cp, [(nd, owned[nd.name]) for nd in nodes], i, i + 1, tokens, pos_)
            slowest, ts = cache[key]
            busy = [x + y for x, y in zip(busy, ts)]
            total += slowest
        c = len(moe_layers) * allsum_time(cl, group, act * tokens) + allsum_time(cl, group, 4 * tokens)
        heads = [p.busy_time(nd, cl, cp, 0, 0, tokens, 0, head=True) for nd in nodes]
        total += max(heads)
        return total + c, c, [x + h for x, h in zip(busy, heads)]

    single, comm, busy1 = step(1, pos)
    cyc, _, _ = step(concurrency, pos)
    P = cp.prefill_chunk
    pre, _, _ = step(P, P // 2)
    return single, cyc, P / pre, comm, busy1


def chain_time(cl: Cluster, members: tuple[str, ...], nbytes: float) -> float:
    """One chained sum over ring neighbours members[0] .. members[-1] (runtime/chain.py,
    scheme "reduce"): the running sum first -> last, the total back last -> first, i.e.
    2(m-1) neighbour hops of `nbytes`, one after the other (each link twice)."""
    return sum(2 * hop_time(cl, a, b, nbytes) for a, b in zip(members, members[1:]))


def mixed_times(p: Profile, cl: Cluster, cp: CostParams,
                stages: list[tuple[tuple[str, ...], int, int, dict[str, int] | None]],
                context: int, concurrency: int) -> tuple[float, float, float, float, list[list[float]]]:
    """(single-stream s/token, per-stream s/token at concurrency, prefill tok/s, comm
    s/token, busy s per step per stage member) for a pipeline of stages (members, start,
    end, owned): one member and owned None, a pipeline stage; several members, an
    expert-parallel stage over those consecutive ring ranks, member t holding owned[t]
    routed experts per MoE layer.

    A stage's time for a step of b tokens: a pipeline stage, its node's busy time; an
    expert-parallel stage, per layer the expected slowest member (each reads every
    non-expert weight and its share of the experts touched: `Profile.member_times`), plus
    per MoE layer one chained sum of the b hidden rows (`chain_time`: 2(m-1) hops). The
    hidden state goes round the ring once: one hop per rank to the next (stage to stage,
    and inside an expert-parallel stage member to member, so that every member has it),
    the last rank sending the
    sampled token back to rank 0; the last stage's last rank runs the head. Streams share
    the stages as in `pipeline_times`: m = min(c, S) micro-batches of ceil(c/m) tokens, a
    step max(sum of stages, m x slowest stage)."""
    pos = position(context, cp)
    S = len(stages)
    act = p.model.activation_bytes_per_token
    ranks = [n for members, _, _, _ in stages for n in members]

    def stage(i: int, tokens: int, pos_: int) -> tuple[float, float, list[float]]:
        """(seconds the stage holds a micro-batch, of which on links, each member's busy)"""
        members, a, b, owned = stages[i]
        last = i == S - 1
        inside = sum(hop_time(cl, x, y, act * tokens) for x, y in zip(members, members[1:]))
        out = 0.0 if len(ranks) == 1 else hop_time(cl, members[-1], stages[(i + 1) % S][0][0],
                                                   4 * tokens if last else act * tokens)
        if owned is None:
            t = p.busy_time(cl.node(members[0]), cl, cp, a, b, tokens, pos_, head=last)
            return t + inside + out, inside + out, [t]
        own = [0.0] * len(members)
        slowest, cache = 0.0, {}
        for layer in range(a, b):
            key = _layer_key(p.model.layers[layer])
            if key not in cache:
                cache[key] = p.member_times(cl, cp, [(cl.node(n), owned[n]) for n in members], layer, layer + 1,
                                            tokens, pos_)
            t, ts = cache[key]
            slowest += t
            own = [x + y for x, y in zip(own, ts)]
        if last:  # the last member samples
            head = p.busy_time(cl.node(members[-1]), cl, cp, 0, 0, tokens, 0, head=True)
            slowest += head
            own[-1] += head
        chains = p.s(p.n_moe, a, b) * chain_time(cl, members, act * tokens)
        return slowest + chains + inside + out, chains + inside + out, own

    one = [stage(i, 1, pos) for i in range(S)]
    single = sum(t for t, _, _ in one)
    comm = sum(c for _, c, _ in one)
    m = min(concurrency, S)
    bt = ceil_div(concurrency, m)
    cyc_stages = [stage(i, bt, pos)[0] for i in range(S)]
    cycle = max(sum(cyc_stages), m * max(cyc_stages))
    P = cp.prefill_chunk
    prefill = P / max(stage(i, P, P // 2)[0] for i in range(S))
    return single, cycle, prefill, comm, [own for _, _, own in one]
