"""The live cluster and a converted model as the planner sees them.

The cluster knows what each node reports (chip, memory, measured bandwidth, interfaces)
and where the shards lie; the placement package knows only numbers. The translation
lives here: each healthy node as a placement `NodeSpec`, the links between them as link
presets (`cluster_spec`), a conversion as its cost numbers, fixed layer ranges and stage
bytes (`Conversion`). `mlxdist plan --nodes auto` calls `placement_nodes()` (through
`mlxdist.cluster`); `serve --nodes` places with `Conversion.plan_on`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from mlxdist.cluster.machine import probe_hardware
from mlxdist.cluster.nodes import NodeView, discover_nodes, link_kind
from mlxdist.cluster.secret import DEFAULT_SECRET_FILE, load_secret
from mlxdist.placement.specs import CHIPS, GB, LINK_PRESETS, Cluster, LinkSpec, NodeSpec, cluster_from_nodes, \
    default_reserve
from mlxdist.placement.model import ModelSpec, load_model
from mlxdist.placement.plan import Plan
from mlxdist.placement.planner import Request, plan_expert_parts, plan_stages, replace_mixed
from mlxdist.shard_format import Manifest

# What a link kind (nodes.link_kind) costs, as the planner's presets. Thunderbolt carries
# TCP here (the ring backend); a link we know nothing of is priced as ethernet.
LINK_PRESET = {"thunderbolt": "tb-tcp", "ethernet": "ethernet-10g", "unknown": "ethernet-10g",
               "loopback": "loopback"}


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


def this_machine(reserve_bytes: int | None = None) -> NodeSpec:
    """This machine as planner numbers, from the same probe a node advertises (machine.py):
    what `mlxdist plan --nodes auto` places on when no cluster answers."""
    hw = probe_hardware()
    view = NodeView("", socket.gethostname() or "localhost", "127.0.0.1", 0, "ok", hw.chip, hw.memory_total,
                    hw.memory_available, hw.gpu_cores, hw.bandwidth_gbs)
    return node_spec(view, reserve_bytes)


def cluster_spec(views: Sequence[NodeView]) -> Cluster:
    """The nodes, in the order given (the ring order), and every link between two of them
    priced by what their interfaces tell (`link_kind`): Thunderbolt, ethernet, loopback.
    The default link is the one kind all pairs share, else ethernet. Nodes of one kind
    (same chip, same memory) get one speed, the slowest they measured: measurements of
    identical machines differ by noise, which must not reorder the stages."""
    specs = [node_spec(v) for v in views]
    slowest: dict[tuple[str, int], float] = {}
    for n in specs:
        kind = (n.chip, n.memory_bytes)
        slowest[kind] = min(slowest.get(kind, n.bandwidth), n.bandwidth)
    specs = [replace(n, bandwidth=slowest[(n.chip, n.memory_bytes)]) for n in specs]
    links = []
    for i, a in enumerate(views):
        for b in views[i + 1:]:
            kind = LINK_PRESET[link_kind(a, b)]
            links.append((kind, LinkSpec(a.name, b.name, *LINK_PRESETS[kind])))
    kinds = {kind for kind, _ in links}
    default = kinds.pop() if len(kinds) == 1 else ("loopback" if not links else "ethernet-10g")
    return cluster_from_nodes(specs, default, tuple(link for _, link in links))


@dataclass(frozen=True)
class Conversion:
    """A converted model (`mlxdist quantize` output) as the planner places it: its cost
    numbers (from its config.json), the layer ranges its shards fix, each stage's bytes on
    disk, the context the runtime serves it at, and the per-node parts of an
    expert-parallel stage (which fix its nodes and their experts)."""

    model: ModelSpec
    ranges: tuple[tuple[int, int], ...]
    stage_bytes: tuple[int, ...]
    context_length: int
    # per stage, an expert-parallel stage's parts as (node, expert ids in row order); () for
    # a pipeline stage. A conversion with parts runs only with the plan it was cut by
    parts: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...] = ()

    @classmethod
    def load(cls, out_dir: str | Path) -> Conversion:
        """OUT's manifest and config, or a one-line UserError."""
        manifest = Manifest.load(out_dir)
        return cls(load_model(str(out_dir)), tuple(manifest.stage_ranges()),
                   tuple(manifest.stage_bytes(out_dir)),
                   int(manifest.config.get("max_position_embeddings") or 4096),
                   tuple(tuple((p.node, p.experts) for p in st.parts) for st in manifest.stages))

    @property
    def expert_parallel(self) -> bool:
        """Whether a stage is cut into per-node expert parts (docs/shard-format.md)."""
        return any(self.parts)

    @property
    def split(self) -> list[int]:
        """Layers per stage (the runtime's `split`)."""
        return [b - a for a, b in self.ranges]

    def request(self, concurrency: int) -> Request:
        """What a first placement reserves KV caches for: the planner's default context
        (or the model's own, when shorter) x `concurrency` requests."""
        return Request(context=min(Request().context, self.context_length), concurrency=concurrency)

    def plan_on(self, views: Sequence[NodeView], req: Request, keep: Mapping[int, str] | None = None) -> Plan:
        """The planner's placement of these stages on `views` (ring order), keeping the
        stages of `keep` (stage -> node name) where they ran if they fit; UserError if
        nothing fits."""
        return plan_stages(self.model, cluster_spec(views), self.ranges, req, keep=keep,
                           stage_bytes=self.stage_bytes)


    def parts_on(self, views: Sequence[NodeView], req: Request, keep: Mapping[int, str]) -> Plan:
        """The planner's placement of the expert-parallel stage's parts on `views` (ring
        order), each part of `keep` (part -> node name) kept where it runs when it fits
        there, the others (a lost node's) whole on nodes with room; UserError if nothing
        fits."""
        return plan_expert_parts(self.model, cluster_spec(views), self.parts[0], req, keep=keep)

    def parts_of(self, plan: Plan, k: int | None = None) -> tuple[tuple[int, ...], ...]:
        """Per member of `plan`'s expert-parallel stage `k` (default: its one; for a
        whole-group plan the members are its group, in order), the parts of stage k it
        runs, in its row order: its expert ids are those parts' ids concatenated."""
        k = plan.expert_parallel_stage if k is None else k
        parts = self.parts[k]
        first = {ids[0]: i for i, (_, ids) in enumerate(parts)}
        out = []
        for node in plan.stages[k].nodes:
            ids, mine, at = plan.stages[k].experts_of(node), [], 0
            while at < len(ids):  # the part starting at each of its runs
                mine.append(first[ids[at]])
                at += len(parts[mine[-1]][1])
            out.append(tuple(mine))
        return tuple(out)

    def held_as(self, k: int, part: int = 0) -> int:
        """The stage number under which a node holds stage `k`'s directory (part 0 or a
        pipeline stage: k) or its `part`-th per-node part: k + part x (number of stages),
        so every directory of the conversion has its own (an expert-parallel conversion
        of one stage: part i as stage i)."""
        return k + part * len(self.ranges)

    def mixed_on(self, views: Sequence[NodeView], req: Request, plan: Plan) -> Plan:
        """A mixed `plan` re-placed on `views` (ring order; the nodes that answer):
        planner.replace_mixed (the lost nodes' ranks moved whole to survivors with room)."""
        return replace_mixed(self.model, cluster_spec(views), plan, req, self.stage_bytes)


def placement_nodes(browse_s: float = 2.0) -> list[NodeSpec]:
    """Discover the cluster's nodes by mDNS and describe the healthy ones; [] when this
    machine has no cluster secret yet (then `plan` describes this machine alone)."""
    secret_file = Path(os.environ.get("MLXDIST_SECRET_FILE") or DEFAULT_SECRET_FILE)
    if not secret_file.exists():
        return []
    secret, _ = load_secret(secret_file, create=False)
    mdns = tuple(a for a in os.environ.get("MLXDIST_MDNS_ADDRESSES", "").split(",") if a)
    views = discover_nodes(os.environ.get("MLXDIST_CLUSTER", "default"), secret,
                           browse_s=browse_s, mdns_addresses=mdns)
    return [node_spec(v) for v in views if v.health == "ok" and v.memory_total > 0]
