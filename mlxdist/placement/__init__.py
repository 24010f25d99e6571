"""Placement: pure functions from (model, nodes, links, context x concurrency) to a plan.

The one call `serve` and the cluster need:

    from mlxdist.placement import place
    plan = place("deepseek-r1", nodes, context=32768, concurrency=4)   # nodes: list[NodeSpec]
    plan.to_json()["stages"]        # [{"layers": [a, b], "nodes": [...], "experts": {...}}]
"""

from __future__ import annotations

from mlxdist.placement.specs import LinkSpec, NodeSpec, cluster_from_nodes, node_from_chip
from mlxdist.placement.model import load_model
from mlxdist.placement.plan import Plan, Stage
from mlxdist.placement.planner import Request, plan


def place(model: str, nodes: list[NodeSpec], *, context: int = 32768, concurrency: int = 4,
          bits: int | None = None, link: str = "tb-tcp", links: tuple[LinkSpec, ...] = (),
          strategy: str = "auto") -> Plan:
    """The fastest plan for `model` (config.json, its directory, or a known name) on
    `nodes`, or a UserError that says what is missing."""
    spec = load_model(model, bits=bits)
    return plan(spec, cluster_from_nodes(list(nodes), link, links),
                Request(context=context, concurrency=concurrency, strategy=strategy),
                describe_model=lambda b: load_model(model, bits=b))


__all__ = ["place", "Plan", "Stage", "NodeSpec", "LinkSpec", "node_from_chip", "cluster_from_nodes"]
