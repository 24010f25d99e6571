"""`plan_expert_parts`: an expert-parallel conversion's fixed per-node parts on the nodes
at hand (what `serve --nodes` re-places with after a node loss), against hand-computed
cases: kept parts stay, a lost node's part goes whole to a node with room, the cost
model picks among the nodes that fit, the shared experts count on rank 0 only, and a
refusal names the part that fits nowhere."""

from __future__ import annotations

import pytest

from mlxdist.errors import UserError
from mlxdist.placement.model import LayerSpec, ModelSpec, Quant
from mlxdist.placement.plan import Plan
from mlxdist.placement.planner import Request, plan_expert_parts
from mlxdist.placement.specs import GB, GiB, NodeSpec, cluster_from_nodes

REQ = Request(context=256, concurrency=1, headroom=0.0)  # budget = memory; no KV (kv_per_token 0)
# one MoE layer: attention 1 GiB, shared experts 1 GiB, 8 routed experts of 1 GiB each. A
# node holds 2 GiB + its experts as rank 0, 1 GiB + its experts otherwise
MODEL = ModelSpec("m", "deepseek_v3", 64, 10, Quant(4, 64, 2),
                  (LayerSpec(0, GiB, 0, GiB, 0, 8 * GiB, 8, 2, 0, 1, 1),), 0, 0, False)
PARTS = (("n0", (0, 1, 2)), ("n1", (3, 4, 5)), ("n2", (6, 7)))
RAN = {0: "n0", 1: "n1", 2: "n2"}


def node(name: str, memory_gib: float, bandwidth_gbs: float = 100.0) -> NodeSpec:
    return NodeSpec(name, int(memory_gib * GiB), bandwidth_gbs * GB, 1e15, 0)


def survivors(*nodes: NodeSpec) -> Plan:
    return plan_expert_parts(MODEL, cluster_from_nodes(list(nodes)), PARTS, REQ, keep=RAN)


def test_without_a_loss_each_part_stays_on_its_node():
    plan = plan_expert_parts(MODEL, cluster_from_nodes([node(f"n{i}", 8) for i in range(3)]), PARTS, REQ)
    assert plan.strategy == "expert-parallel" and plan.group == ("n0", "n1", "n2")
    assert plan.stages[0].experts == PARTS
    assert [ld.weight_bytes for ld in plan.loads] == [5 * GiB, 4 * GiB, 3 * GiB]  # shared on n0 only
    assert Plan.from_json(plan.to_json()) == plan


def test_the_lost_nodes_part_goes_whole_to_the_node_with_room():
    # n0 (rank 0) holds 5 GiB, n1 4 GiB; n2's part (2 GiB) fits on n0 (10 GiB): room 3 left,
    # on n1 (6 GiB): room 0. Both as fast (the slowest rank reads 5 experts either way): the
    # first candidate, the most room, wins
    plan = survivors(node("n0", 10), node("n1", 6))
    assert plan.group == ("n0", "n1")
    assert plan.stages[0].experts == (("n0", (0, 1, 2, 6, 7)), ("n1", (3, 4, 5)))
    assert [(ld.node, ld.weight_bytes, ld.n_experts) for ld in plan.loads] == [
        ("n0", 7 * GiB, 5), ("n1", 4 * GiB, 3)]
    assert plan.reason.startswith("parts kept where they ran, the others on the nodes with most room")
    # n0 has no room for 2 more GiB (7 > 6): n1 takes it, its experts its part's, then n2's
    plan = survivors(node("n0", 6), node("n1", 10))
    assert plan.stages[0].experts == (("n0", (0, 1, 2)), ("n1", (3, 4, 5, 6, 7)))
    assert [ld.weight_bytes for ld in plan.loads] == [5 * GiB, 6 * GiB]


def test_the_cost_model_picks_among_the_nodes_that_fit():
    # n0 has the most room left after taking the part (12 - 7 = 5 against 10 - 6 = 4), but
    # n1 reads twice as fast: 5 experts there keep the slowest rank faster (7 GiB at 200
    # GB/s against n0's 5 GiB at 100), so the cost model takes n1
    plan = survivors(node("n0", 12), node("n1", 10, bandwidth_gbs=200))
    assert plan.stages[0].experts == (("n0", (0, 1, 2)), ("n1", (3, 4, 5, 6, 7)))
    assert "the others on n1" in plan.reason and "fastest of 2" in plan.reason


def test_the_shared_experts_move_with_rank_0():
    # n0 lost: n1 becomes rank 0 and holds the shared experts (2 + 3 GiB); n0's part (3
    # GiB) fits only on n2 (1 + 2 + 3 = 6 GiB)
    plan = plan_expert_parts(MODEL, cluster_from_nodes([node("n1", 6), node("n2", 6)]), PARTS, REQ, keep=RAN)
    assert plan.group == ("n1", "n2")
    assert plan.stages[0].experts == (("n1", (3, 4, 5)), ("n2", (0, 1, 2, 6, 7)))  # in part order
    assert [ld.weight_bytes for ld in plan.loads] == [5 * GiB, 6 * GiB]


def test_refusals_in_one_line():
    # 5 GiB each: n0 and n1 are full with their own parts; nothing takes n2's 2 experts
    with pytest.raises(UserError) as e:
        survivors(node("n0", 5), node("n1", 5))
    msg = str(e.value)
    assert "\n" not in msg and "n2's expert part (experts 6, 7) fits on no node" in msg, msg
    assert "n0 5.00, n1 5.00 GiB usable" in msg and "1.000 GiB per expert" in msg, msg
    with pytest.raises(UserError, match="fit together only on one node"):
        survivors(node("n0", 100))
    with pytest.raises(UserError, match="holding each of its 8 routed experts once"):
        plan_expert_parts(MODEL, cluster_from_nodes([node("n0", 9)]), PARTS[:2], REQ)
