"""The live cluster as the planner sees it: each healthy node as a placement `NodeSpec`.

`mlxdist plan --nodes auto` calls `placement_nodes()` (through `mlxdist.cluster`). The
cluster knows what each node reports (chip, memory, measured bandwidth); the placement
package knows only numbers, so the translation lives here.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlxdist.cluster.coordinator import NodeView
from mlxdist.placement.hardware import CHIPS, GB, NodeSpec, default_reserve


def node_spec(view: NodeView, reserve_bytes: int | None = None) -> NodeSpec:
    """A node's status as planner numbers. A known Apple chip gives its peak bandwidth and
    compute; otherwise the bandwidth the node measured at start-up stands in for both."""
    chip = next((c for name, c in CHIPS.items() if name != "generic" and name in view.chip), None)
    memory = view.memory_total
    reserve = default_reserve(memory) if reserve_bytes is None else reserve_bytes
    if chip is not None:
        return NodeSpec(view.name, memory, chip.bandwidth_gbs * GB, chip.fp16_tflops * 1e12, reserve, chip.name)
    generic = CHIPS["generic"]
    bandwidth = (view.bandwidth_gbs or generic.bandwidth_gbs) * GB
    return NodeSpec(view.name, memory, bandwidth, generic.fp16_tflops * 1e12, reserve, view.chip or "generic")


def placement_nodes(browse_s: float = 2.0) -> list[NodeSpec]:
    """Discover the cluster's nodes by mDNS and describe the healthy ones; [] when this
    machine has no cluster secret yet (then `plan` describes this machine alone)."""
    from mlxdist.cluster.coordinator import discover_nodes
    from mlxdist.cluster.secret import DEFAULT_SECRET_FILE, load_secret

    secret_file = Path(os.environ.get("MLXDIST_SECRET_FILE") or DEFAULT_SECRET_FILE)
    if not secret_file.exists():
        return []
    secret, _ = load_secret(secret_file, create=False)
    mdns = tuple(a for a in os.environ.get("MLXDIST_MDNS_ADDRESSES", "").split(",") if a)
    views = discover_nodes(os.environ.get("MLXDIST_CLUSTER", "default"), secret,
                           browse_s=browse_s, mdns_addresses=mdns)
    return [node_spec(v) for v in views if v.health == "ok" and v.memory_total > 0]
