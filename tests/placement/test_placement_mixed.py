"""Mixed plans: a pipeline one of whose stages is expert-parallel over some consecutive
ranks after rank 0, its MoE combine a chained sum over the neighbour links. The planner
searches them (strategy "mixed", and "auto"), prices them by hand-checkable rules, keeps
them within memory, gives every routed expert to one member, picks them where the
numbers say so and not otherwise; the plan format holds them and refuses what the
runtime cannot run, in one line."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mlxdist.errors import UserError
from mlxdist.placement.cost import CostParams, Profile, kv_tokens, mixed_times, pipeline_times
from mlxdist.placement.model import LayerSpec, ModelSpec, Quant, describe, load_model
from mlxdist.placement.plan import Plan
from mlxdist.placement.planner import Request, budget, candidates, plan
from mlxdist.placement.specs import GB, GiB, LINK_PRESETS, NodeSpec, cluster_from_nodes, node_from_chip

from tests.placement.test_placement_planner import chips, independent_memory, memories

# Two layers: 0 dense (attention 1 GiB, MLP 2 GiB), 1 MoE (attention 1 GiB, shared experts
# 1 GiB, 8 routed experts of 1 GiB, 2 per token); embedding 1 GiB, head 1 GiB; no KV
# cache, next to no FLOPs (memory bound). hidden 64 x 2 bytes: 128 bytes a row.
MODEL = ModelSpec("m", "deepseek_v3", 64, 10, Quant(4, 64, 2),
                  (LayerSpec(0, GiB, 2 * GiB, 0, 0, 0, 0, 0, 0, 1),
                   LayerSpec(1, GiB, 0, GiB, 0, 8 * GiB, 8, 2, 0, 1, 1)), GiB, GiB, False)
REQ = Request(context=256, concurrency=1, headroom=0.0)  # budget = usable memory


def node(name: str, memory_gib: float, bandwidth_gbs: float = 100.0) -> NodeSpec:
    return NodeSpec(name, int(memory_gib * GiB), bandwidth_gbs * GB, 1e15, 0)


def test_a_model_no_pipeline_holds_fits_with_one_stages_experts_split():
    """a (6 GiB) holds layer 0 and the embedding (4 GiB) but not layer 1 (11 GiB with the
    head), nor can b or c (8 GiB) alone; whole-group EP would put 6 GiB of non-expert
    weights on each node. Split between b and c, layer 1 fits: b holds its attention, the
    shared experts (the stage's first member runs them) and 4 experts (6 GiB), c its
    attention, the head (the last member samples) and 4 experts (6 GiB). The only plan
    that fits."""
    cl = cluster_from_nodes([node("a", 6), node("b", 8), node("c", 8)])
    for strategy in ("pipeline", "expert-parallel"):
        with pytest.raises(UserError, match="does not fit"):
            plan(MODEL, cl, Request(256, 1, 0.0, strategy=strategy))
    p = plan(MODEL, cl, REQ)
    assert p.strategy == "mixed" and p.group == ("a", "b", "c")
    assert [(s.layers, s.nodes) for s in p.stages] == [((0, 1), ("a",)), ((1, 2), ("b", "c"))]
    assert p.stages[1].experts == (("b", (0, 1, 2, 3)), ("c", (4, 5, 6, 7)))
    assert [(ld.node, ld.weight_bytes, ld.n_experts, ld.layers) for ld in p.loads] == [
        ("a", 4 * GiB, 8, ((0, 1),)), ("b", 6 * GiB, 4, ((1, 2),)), ("c", 6 * GiB, 4, ((1, 2),))]
    assert p.reason.startswith("mixed over 3 nodes, 2 stages, stage 1 (layer 1) expert-parallel over b+c "
                               "(4/4 experts, chained combine); ")
    assert "the only plan that fits" in p.reason
    assert Plan.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_the_price_is_the_hand_computation():
    """One stream over tb-tcp links (0.3 ms, 2.5 GB/s) and nodes reading 50 GB/s (100 at
    efficiency 0.5): a reads layer 0 (3 GiB) and hands 128 bytes to b; b hands them on to
    c; b and c each read layer 1's attention and shared experts (2 GiB) and the one expert
    of their 4 a token touches on average (4 x (1 - (1 - 2/8))), then sum over the b-c
    link and back (2(m-1) = 2 hops); c reads the head (1 GiB) and sends the 4-byte token
    to a. Every layer costs 20 us more. The step waits for the slower of b and c, whose
    expert counts vary: the expected maximum of two normals with the count's mean and
    spread, mu + sd / sqrt(pi), the spread counted here over every routing."""
    cl = cluster_from_nodes([node("a", 6), node("b", 8), node("c", 8)])
    p = plan(MODEL, cl, REQ)
    bw, lat = LINK_PRESETS["tb-tcp"]
    read = 100e9 * 0.5

    def hop(nbytes: float) -> float:
        return lat + nbytes / bw

    def touched(tokens: int) -> tuple[float, float]:
        """Mean and standard deviation of how many of a member's 4 experts (of 8) a batch
        of `tokens` touches, each token picking 2 distinct experts: every routing counted."""
        routings = list(itertools.product(itertools.combinations(range(8), 2), repeat=tokens))
        counts = [len({e for pick in r for e in pick if e < 4}) for r in routings]
        mu = sum(counts) / len(counts)
        return mu, math.sqrt(sum((c - mu) ** 2 for c in counts) / len(counts))

    def slowest(tokens: int) -> float:  # the slower member's experts, in GiB
        mu, sd = touched(tokens)
        return mu + sd / math.sqrt(math.pi)

    stage0 = 3 * GiB / read + 20e-6 + hop(128)
    layer1 = (2 * GiB + 1.0 * GiB) / read + 20e-6
    chain = 2 * hop(128)
    stage1 = hop(128) + (2 + slowest(1)) * GiB / read + 20e-6 + chain + GiB / read + hop(4)
    assert p.estimate.decode_ms_per_token == pytest.approx((stage0 + stage1) * 1e3, rel=1e-9)
    assert p.estimate.step_ms_at_concurrency == pytest.approx((stage0 + stage1) * 1e3, rel=1e-9)
    assert p.estimate.comm_ms_per_token == pytest.approx((2 * hop(128) + hop(4) + chain) * 1e3, rel=1e-12)
    busy = {ld.node: ld.busy_ms_per_step for ld in p.loads}  # each member's own: its average
    assert busy == pytest.approx({"a": (3 * GiB / read + 20e-6) * 1e3, "b": layer1 * 1e3,
                                  "c": (layer1 + GiB / read) * 1e3}, rel=1e-12)
    assert touched(1)[0] == pytest.approx(1.0) and touched(2)[0] == pytest.approx(4 * (1 - 0.75 ** 2))
    # 4 streams, 2 stages: 2 micro-batches of 2 tokens; a batch of 2 touches 4 x (1 - 0.75^2)
    # experts on each member on average; a step is 2 x the slower stage (or the sum, if larger)
    p4 = plan(MODEL, cl, Request(context=256, concurrency=4, headroom=0.0))
    s0 = 3 * GiB / read + 20e-6 + hop(256)
    s1 = hop(256) + (2 + slowest(2)) * GiB / read + 20e-6 + 2 * hop(256) + GiB / read + hop(8)
    assert p4.estimate.step_ms_at_concurrency == pytest.approx(max(s0 + s1, 2 * max(s0, s1)) * 1e3, rel=1e-9)


def test_the_chain_costs_two_hops_per_member_and_moe_layer():
    """Adding a member to the expert-parallel stage adds two hops per MoE layer to the
    combine, and one hop to hand the hidden state on, at the links' own speeds."""
    slow = 2e-3
    nodes = [node("a", 6), node("b", 8), node("c", 8), node("d", 8)]
    from mlxdist.placement.specs import LinkSpec

    cl = cluster_from_nodes(nodes, "tb-tcp", (LinkSpec("c", "d", 1e9, slow),))
    p = Profile(MODEL)
    owned3 = {"b": 3, "c": 3, "d": 2}
    owned2 = {"b": 4, "c": 4}
    _, _, _, comm3, _ = mixed_times(p, cl, CostParams(), [(("a",), 0, 1, None), (("b", "c", "d"), 1, 2, owned3)],
                                    256, 1)
    _, _, _, comm2, _ = mixed_times(p, cl, CostParams(), [(("a",), 0, 1, None), (("b", "c"), 1, 2, owned2)], 256, 1)
    bw, lat = LINK_PRESETS["tb-tcp"]
    # 3 members: a->b, b->c, c->d, d->a (token), chain b-c-d and back; 2 members: a->b, b->c, c->a, chain b-c
    want3 = (lat + 128 / bw) * 2 + (slow + 128 / 1e9) + (lat + 4 / bw) + 2 * (lat + 128 / bw) + 2 * (slow + 128 / 1e9)
    want2 = (lat + 128 / bw) * 2 + (lat + 4 / bw) + 2 * (lat + 128 / bw)
    assert comm3 == pytest.approx(want3, rel=1e-12) and comm2 == pytest.approx(want2, rel=1e-12)


def test_pipeline_stages_alone_are_priced_as_a_pipeline():
    r1 = load_model("deepseek-r1")
    nodes = [node_from_chip(f"n{i}", "M2 Ultra", 192) for i in range(3)]
    cl = cluster_from_nodes(nodes)
    p = Profile(r1)
    ranges = [(0, 21), (21, 41), (41, 61)]
    for context, conc in ((32768, 4), (4096, 1), (512, 7)):
        a = pipeline_times(p, cl, CostParams(), [(n.name, x, y) for n, (x, y) in zip(nodes, ranges)], context, conc)
        b = mixed_times(p, cl, CostParams(), [((n.name,), x, y, None) for n, (x, y) in zip(nodes, ranges)],
                        context, conc)
        assert a[:4] == pytest.approx(b[:4], rel=1e-12) and a[4] == pytest.approx([x for (x,) in b[4]], rel=1e-12)


def test_mixed_where_the_numbers_say_so_and_not_otherwise():
    """DeepSeek-R1, 4 requests of 32768 tokens over TCP. An M3 Ultra and two M4 Pros (64
    GB): a pipeline can use only one M4 Pro (they cannot hold a third of the model each),
    but split expert-parallel they hold the last layers together, and the M3 Ultra's
    share shrinks: mixed is the fastest. Three M2 Ultras: the even pipeline holds it and
    is faster than any mixed plan (a mixed stage reads all its attention on every member,
    and pays 2 hops per MoE layer)."""
    r1 = load_model("deepseek-r1")
    req = Request(context=32768, concurrency=4)
    ultra_minis = cluster_from_nodes([node_from_chip("studio", "M3 Ultra", 512),
                                      node_from_chip("mini-0", "M4 Pro", 64), node_from_chip("mini-1", "M4 Pro", 64)])
    p = plan(r1, ultra_minis, req)
    assert p.strategy == "mixed" and p.group == ("studio", "mini-0", "mini-1")
    assert [s.nodes for s in p.stages] == [("studio",), ("mini-0", "mini-1")]
    best_other = min(x.estimate.step_ms_at_concurrency for x in candidates(r1, ultra_minis, req)
                     if x.strategy != "mixed")
    assert p.estimate.step_ms_at_concurrency < 0.95 * best_other

    m2 = cluster_from_nodes([node_from_chip(f"m2u-{i}", "M2 Ultra", 192) for i in range(3)])
    p = plan(r1, m2, req)
    assert p.strategy == "pipeline"
    mixed = plan(r1, m2, Request(context=32768, concurrency=4, strategy="mixed"))
    assert mixed.strategy == "mixed" and mixed.estimate.step_ms_at_concurrency > p.estimate.step_ms_at_concurrency
    assert "next: mixed over 3 nodes" in p.reason
    # no experts, or expert parallelism not allowed: no mixed plan
    with pytest.raises(UserError, match="does not fit"):
        plan(r1, ultra_minis, Request(context=32768, concurrency=4, allow_expert_parallel=False, strategy="mixed"))
    llama = load_model("llama-3.1-70b")
    assert all(x.strategy != "mixed" for x in candidates(llama, m2, Request(strategy="auto")))
    with pytest.raises(UserError, match="unknown strategy 'mixd'"):
        plan(r1, m2, Request(strategy="mixd"))


@st.composite
def moe_models(draw):
    """Random deepseek_v3 configs (as test_placement_planner's), 2 to 64 layers."""
    layers = draw(st.integers(2, 64))
    experts = draw(st.sampled_from([8, 16, 64, 256]))
    c = {"model_type": "deepseek_v3", "hidden_size": 2048, "intermediate_size": 8192,
         "moe_intermediate_size": 1024, "num_hidden_layers": layers, "num_attention_heads": 16,
         "n_shared_experts": draw(st.sampled_from([0, 1])), "n_routed_experts": experts,
         "num_experts_per_tok": min(8, experts // 2), "kv_lora_rank": 512, "q_lora_rank": 1536,
         "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
         "first_k_dense_replace": draw(st.integers(0, 3)) % layers, "vocab_size": 102400}
    return describe(c, bits=draw(st.sampled_from([3, 4, 8])))


@st.composite
def three_or_more(draw, model):
    """3 to 6 nodes, sized against `model` most of the time (so that some need their
    experts split), over TCP or RDMA."""
    n = draw(st.integers(3, 6))
    nodes = []
    for i in range(n):
        gb = (model.total_bytes / GB / n * draw(st.floats(0.3, 3.0)) + 8) if draw(st.integers(0, 3)) else draw(memories)
        nodes.append(node_from_chip(f"n{i}", draw(chips), gb))
    return cluster_from_nodes(nodes, draw(st.sampled_from(["tb-tcp", "tb5-rdma"])))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=moe_models(), data=st.data(), context=st.sampled_from([512, 4096, 32768]),
       concurrency=st.integers(1, 8))
def test_every_mixed_plan_fits_and_places_each_expert_once(model, data, context, concurrency) -> None:
    """Every mixed candidate of random clusters: memory within each node's budget
    (recomputed from the layer table), every layer once, every routed expert on exactly
    one member, the expert-parallel stage consecutive ranks after rank 0 with a MoE layer,
    and its JSON read back as itself."""
    cluster = data.draw(three_or_more(model))
    req = Request(context=context, concurrency=concurrency, strategy="mixed")
    found = candidates(model, cluster, req)
    event(f"{len(found)} mixed plan(s)" if found else "none")
    for p in found:
        assert p.strategy == "mixed"
        (k,) = [i for i, s in enumerate(p.stages) if s.expert_parallel]
        assert k > 0 and p.group == tuple(n for s in p.stages for n in s.nodes)
        assert p.stage_ranks()[k] == tuple(range(k, k + len(p.stages[k].nodes)))
        assert any(x.is_moe for x in model.layers[slice(*p.stages[k].layers)])
        covered = [i for s in p.stages for i in range(*s.layers)]
        assert covered == list(range(model.num_layers))
        for s in p.stages:
            kv = sum(x.kv_bytes_per_token for x in model.layers[slice(*s.layers)]) * kv_tokens(context) * concurrency
            for t, name in enumerate(s.nodes):
                owned = len(s.experts_of(name)) if s.expert_parallel else None
                head = s.layers[1] == model.num_layers and t == len(s.nodes) - 1  # (the sampling member)
                w = independent_memory(model, s.layers, owned, s.layers[0] == 0, head, shared=t == 0)
                load = next(ld for ld in p.loads if ld.node == name)
                assert (load.weight_bytes, load.kv_bytes) == (w, kv)
                assert w + kv <= budget(cluster.node(name), req.headroom)
        ids = sorted(e for _, mine in p.stages[k].experts for e in mine)
        assert ids == list(range(model.layers[-1].n_routed)) and all(mine for _, mine in p.stages[k].experts)
        assert Plan.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_plans_the_runtime_cannot_run_are_refused_in_one_line(tmp_path):
    """The runtime's rules, each broken once: no expert-parallel stage on rank 0, its
    ranks consecutive, at most one, the group the stages' nodes in order, the strategy
    saying what the stages are, every member some experts and every expert one member."""
    p = plan(MODEL, cluster_from_nodes([node("a", 6), node("b", 8), node("c", 8)]), REQ)
    doc = json.loads(json.dumps(p.to_json()))
    assert doc["group"] == ["a", "b", "c"] and Plan.from_json(doc) == p

    def with_stages(*stages, **fields):
        return {**doc, "stages": list(stages), **fields}

    four = ["a", "b", "c", "d"]
    pipe = {"layers": [0, 1], "nodes": ["a"]}
    bc = {"layers": [1, 2], "nodes": ["b", "c"], "experts": {"b": [0, 1, 2, 3], "c": [4, 5, 6, 7]}}
    bad = [
        (with_stages({**bc, "layers": [0, 1], "nodes": ["a", "b"], "experts": {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]}},
                     {"layers": [1, 2], "nodes": ["c"]}),
         r"stages\[0\]: a mixed plan's expert-parallel stage cannot include rank 0 \(a\)"),
        (with_stages(pipe, {**bc, "nodes": ["b", "d"], "experts": {"b": [0, 1, 2, 3], "d": [4, 5, 6, 7]}},
                     group=four),
         r"stages\[1\].nodes \['b', 'd'\] are not consecutive ranks"),
        (with_stages(pipe, bc, {"layers": [2, 2], "nodes": ["d", "a"], "experts": {"d": [0], "a": [1]}}, group=four),
         "stages 1, 2 are expert-parallel: a plan has at most one"),
        (with_stages(pipe, bc, strategy="pipeline"), r"strategy is 'pipeline' but stages\[1\] is expert-parallel"),
        (with_stages(pipe, bc, strategy="expert-parallel"), "beside pipeline stages: 'mixed'"),
        (with_stages(pipe, bc, group=four), r"group \['a', 'b', 'c', 'd'\] is not the stages' nodes"),
        (with_stages(pipe, {**bc, "experts": {"b": [0, 1, 2, 4], "c": [4, 5, 6, 7]}}),
         r"stages\[1\].experts give expert 4 to more than one node"),
        (with_stages(pipe, {**bc, "experts": {"b": list(range(8)), "c": []}}), "must give each of its nodes some"),
        (with_stages(pipe, {**bc, "experts": {"b": list(range(8))}}), "must give each of its nodes some"),
        (with_stages({**bc, "layers": [0, 2]}, strategy="expert-parallel"),
         r"one stage runs on the whole group \['a', 'b', 'c'\] in ring order"),
        (with_stages(pipe, {"layers": [1, 2], "nodes": ["b"]}, strategy="mixed"), "no stage is expert-parallel"),
    ]
    for i, (d, match) in enumerate(bad):
        with pytest.raises(ValueError, match=match):
            Plan.from_json(d)
        f = tmp_path / f"bad{i}.json"
        f.write_text(json.dumps(d))
        with pytest.raises(UserError) as e:
            Plan.load(f)
        assert "\n" not in str(e.value) and str(e.value).startswith(f"plan {f} is not a plan from"), e.value
