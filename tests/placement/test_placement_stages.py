"""`plan_stages`: a conversion's fixed stages on the nodes at hand (what `serve --nodes`
places with), against hand-computed cases: stages stay where they ran, only a lost node's
stages move, a refusal names the GiB missing, the cost model's faster assignment wins."""

from __future__ import annotations

import pytest

from mlxdist.errors import UserError
from mlxdist.placement.specs import GB, GiB, NodeSpec, cluster_from_nodes
from mlxdist.placement.model import LayerSpec, ModelSpec, Quant
from mlxdist.placement.plan import Plan
from mlxdist.placement.planner import Request, plan_stages

# Context 256 x 1 request: mlx-lm's cache holds exactly 256 tokens, no headroom, so a
# node's budget is its memory and a stage's need is its bytes + 256 x its KV per token.
REQ = Request(context=256, concurrency=1, headroom=0.0)


def model(layer_bytes: list[int], kv_per_token: int = 0) -> ModelSpec:
    """A dense model whose layer i reads layer_bytes[i] (attention only), no embedding
    or head, one parameter per layer (compute never dominates)."""
    layers = tuple(LayerSpec(i, b, 0, 0, 0, 0, 0, 0, kv_per_token, 1) for i, b in enumerate(layer_bytes))
    return ModelSpec("m", "llama", 64, 10, Quant(4, 64, 2), layers, 0, 0, False)


def node(name: str, memory_gib: float, bandwidth_gbs: float = 100.0) -> NodeSpec:
    return NodeSpec(name, int(memory_gib * GiB), bandwidth_gbs * GB, 1e15, 0)


THREE = [(0, 1), (1, 2), (2, 3)]


def test_first_placement_follows_the_ring_on_identical_nodes():
    plan = plan_stages(model([GB] * 3), cluster_from_nodes([node("a", 10), node("b", 10), node("c", 10)]),
                       THREE, REQ, stage_bytes=[4 * GiB] * 3)
    assert plan.group == ("a", "b", "c") and plan.strategy == "pipeline"
    assert [(s.layers, s.nodes) for s in plan.stages] == [((0, 1), ("a",)), ((1, 2), ("b",)), ((2, 3), ("c",))]


def test_stages_stay_where_they_ran_when_they_fit():
    # b ran stage 0 and a stage 1: the ring order (a, b) would be as fast, but moving
    # costs a delivery, so the stages stay
    plan = plan_stages(model([GB] * 2), cluster_from_nodes([node("a", 10), node("b", 10)]),
                       [(0, 1), (1, 2)], REQ, keep={0: "b", 1: "a"}, stage_bytes=[4 * GiB] * 2)
    assert plan.group == ("b", "a")


def test_only_the_lost_nodes_stages_move():
    # d (stage 3) is lost; a, b, c keep theirs. Room left: a 10-4=6, b 7-4=3, c 7-4=3
    # GiB: stage 3 (4 GiB) fits only on a
    stages = [(0, 1), (1, 2), (2, 3), (3, 4)]
    keep = {0: "a", 1: "b", 2: "c", 3: "d"}

    def group(*memory: float) -> tuple[str, ...]:
        nodes = [node(n, m) for n, m in zip("abc", memory)]
        return plan_stages(model([GB] * 4), cluster_from_nodes(nodes), stages, REQ, keep=keep,
                           stage_bytes=[4 * GiB] * 4).group

    assert group(10, 7, 7) == ("a", "b", "c", "a")
    assert group(7, 9, 7) == ("a", "b", "c", "b")  # now only b has room
    # a and c both have room: after stage 2 on c, stage 3 on c keeps the hidden state's
    # hop inside c (only the 4-byte token crosses to a), so the cost model takes c
    assert group(10, 7, 8) == ("a", "b", "c", "c")
    plan = plan_stages(model([GB] * 4), cluster_from_nodes([node("a", 10), node("b", 7), node("c", 7)]), stages,
                       REQ, keep=keep, stage_bytes=[4 * GiB] * 4)
    doc = plan.to_json()  # a node named twice in the group: one entry, its first rank, both ranges
    assert doc["group"] == ["a", "b", "c", "a"]
    assert [n["name"] for n in doc["nodes"]] == ["a", "b", "c"]
    a = doc["nodes"][0]
    assert a["rank"] == 0 and a["layers"] == [[0, 1], [3, 4]] and a["weight_bytes"] == 8 * GiB
    assert Plan.from_json(doc) == plan  # and it reads back as the same plan


def test_kept_stages_move_only_when_nothing_else_fits():
    # a holds stage 0 (6 GiB) and has 2 GiB left; b, stage 1's node, is lost and c has
    # 5 GiB: stage 1 (5 GiB) fits only on c
    plan = plan_stages(model([GB] * 2), cluster_from_nodes([node("a", 8), node("c", 5)]), [(0, 1), (1, 2)],
                       REQ, keep={0: "a", 1: "b"}, stage_bytes=[6 * GiB, 5 * GiB])
    assert plan.group == ("a", "c")
    # c too small as well: stage 0 must leave a, which the fresh candidates allow
    plan = plan_stages(model([GB] * 2), cluster_from_nodes([node("a", 8), node("c", 6.5)]), [(0, 1), (1, 2)],
                       REQ, keep={0: "a", 1: "b"}, stage_bytes=[6 * GiB, 1.5 * GiB])
    assert plan.group in (("a", "a"), ("c", "a"), ("a", "c"))


def test_refusal_names_the_gib_missing_in_all():
    with pytest.raises(UserError) as e:
        plan_stages(model([GB] * 3), cluster_from_nodes([node("a", 5), node("b", 6)]), THREE, REQ,
                    keep={0: "a", 1: "b", 2: "c"}, stage_bytes=[4 * GiB] * 3)
    msg = str(e.value)
    assert "\n" not in msg
    assert "its 3 stages need 12.00 GiB" in msg and "the nodes offer 11.00 GiB (a 5.00, b 6.00)" in msg
    assert msg.endswith("1.00 GiB missing"), msg


def test_refusal_names_the_stage_that_fits_nowhere():
    # 15 GiB on 16 GiB, but 5 + 5 + 5 on two 8 GiB nodes: the third stage finds 3 GiB
    with pytest.raises(UserError) as e:
        plan_stages(model([GB] * 3), cluster_from_nodes([node("a", 8), node("b", 8)]), THREE, REQ,
                    stage_bytes=[5 * GiB] * 3)
    msg = str(e.value)
    assert "stage 2 (layers 2-2) needs 5.00 GiB but the most room left is 3.00 GiB, on a" in msg, msg
    assert msg.endswith("2.00 GiB missing"), msg


def test_kv_cache_and_model_numbers_count_without_stage_bytes():
    # no stage_bytes: the model's own numbers, 1 GiB per layer; KV: 2 MiB per token per
    # layer x 256 tokens x 2 requests = 1 GiB per stage: 2 GiB per stage, a has 3
    m = model([GiB] * 2, kv_per_token=2 << 20)
    req = Request(context=256, concurrency=2, headroom=0.0)
    plan = plan_stages(m, cluster_from_nodes([node("a", 3), node("b", 3)]), [(0, 1), (1, 2)], req)
    assert plan.group == ("a", "b")
    assert [ld.kv_bytes for ld in plan.loads] == [GiB, GiB] and [ld.weight_bytes for ld in plan.loads] == [GiB, GiB]
    with pytest.raises(UserError, match=r"need 4.00 GiB \(weights 2.00 GiB \+ KV cache 2.00 GiB for 256 tokens "
                                        r"x 2 requests\) but the nodes offer 3.90 GiB.*0.10 GiB missing"):
        plan_stages(m, cluster_from_nodes([node("a", 3), node("b", 0.9)]), [(0, 1), (1, 2)], req)


def test_the_faster_assignment_wins():
    # stage 0 reads 1 GB, stage 1 reads 3 GB; "fast" reads 800 GB/s, "slow" 100 GB/s, half
    # of it achieved (the cost model's efficiency). The ring order (fast, slow) costs
    # 1/400 + 3/50 s = 62.5 ms; the heaviest stage on the fastest node: 1/50 + 3/400 s =
    # 27.5 ms (+ 20 us per layer and the hops on both)
    nodes = [node("fast", 100, 800), node("slow", 100, 100)]
    plan = plan_stages(model([GB, 3 * GB]), cluster_from_nodes(nodes, link="loopback"), [(0, 1), (1, 2)], REQ)
    assert plan.group == ("slow", "fast")
    hops = 2 * 30e-6 + (64 * 2 + 4) / (5 * GB)  # two loopback hops: a hidden state, a token
    assert plan.estimate.decode_ms_per_token == pytest.approx((1 / 50 + 3 / 400 + 2 * 20e-6 + hops) * 1e3)
    assert "fastest of 2 assignments" in plan.reason
    assert "next: stages on the nodes in ring order, 62.6 ms" in plan.reason
    # the same stages in the other order read the other way round: the ring order wins
    plan = plan_stages(model([3 * GB, GB]), cluster_from_nodes(nodes, link="loopback"), [(0, 1), (1, 2)], REQ)
    assert plan.group == ("fast", "slow")


def test_a_node_running_two_stages_does_them_one_after_the_other():
    # concurrency 2 over 2 stages: the pipeline keeps both busy, unless one node runs both.
    # One fast node (2 x 1/400 s per stage at 1 token) vs fast + slow (1/400 + 1/50 s):
    # single stream the fast node alone wins; at concurrency 2 the step is 2 x the
    # busiest node: fast alone 2 x 5 ms = 10 ms, fast + slow 2 x 20 ms: still fast alone
    nodes = [node("fast", 100, 800), node("slow", 100, 100)]
    req = Request(context=256, concurrency=2, headroom=0.0)
    plan = plan_stages(model([GB, GB]), cluster_from_nodes(nodes, link="loopback"), [(0, 1), (1, 2)], req,
                       keep={0: "fast", 1: "gone"})
    assert plan.group == ("fast", "fast") and plan.strategy == "single"
    assert plan.estimate.step_ms_at_concurrency >= 2 * (2 / 400) * 1e3


def test_ranges_must_cut_the_model():
    with pytest.raises(UserError, match="consecutive non-empty stages"):
        plan_stages(model([GB] * 3), cluster_from_nodes([node("a", 10)]), [(0, 1), (2, 3)], REQ)
    with pytest.raises(UserError, match="consecutive non-empty stages"):
        plan_stages(model([GB] * 3), cluster_from_nodes([node("a", 10)]), [(0, 2)], REQ)
