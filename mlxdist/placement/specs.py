"""Nodes, links and the built-in table of Apple chips.

Numbers only: the cluster package (its nodes, or this machine) or a nodes.json supplies them;
nothing here opens a socket or imports MLX.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxdist.errors import UserError

GB = 10**9
GiB = 2**30


@dataclass(frozen=True)
class Chip:
    name: str
    bandwidth_gbs: float  # peak memory bandwidth, GB/s (Apple's figure)
    gpu_cores: int
    fp16_tflops: float  # rough GPU fp16 throughput, used only for prefill estimates
    source: str


# Peak memory bandwidth and GPU cores as Apple announced them (sources beside each). The
# TFLOPS column is OUR estimate, not a published figure (GPU cores x 128 ALUs x 2 flops x
# clock, ~1.4 GHz; Apple GPUs run fp16 at the fp32 rate): it only shapes prefill estimates.
CHIPS: dict[str, Chip] = {
    c.name: c
    for c in (
        Chip("M3 Ultra", 819, 80, 28.7,
             "https://techpowerup.com/news-tags/Mac%20Studio (819 GB/s, 80-core GPU)"),
        Chip("M2 Ultra", 800, 76, 27.2,
             "Apple newsroom, June 2023 (800 GB/s); https://www.ghacks.net/2023/08/14/apples-m3-ultra-mac-studio-may-have-a-32-core-cpu-and-80-core-gpu/ (76-core GPU)"),
        Chip("M4 Max", 546, 40, 16.2,
             "https://peerip.com/best-apple-silicon-hardware-for-mlx-local-llm-inference/ (546 GB/s)"),
        Chip("M4 Pro", 273, 20, 8.1,
             "https://www.macrumors.com/2024/10/29/apple-announces-m4-pro-chip/ (273 GB/s, 20-core GPU)"),
        Chip("generic", 100, 0, 1.0, "default for an unknown machine (a guess, override it)"),
    )
}


@dataclass(frozen=True)
class NodeSpec:
    name: str
    memory_bytes: int  # total physical memory
    bandwidth: float  # bytes/s, peak
    flops: float  # fp16 flop/s, peak
    reserve_bytes: int  # left to the OS and other programs
    chip: str = "generic"

    @property
    def usable_bytes(self) -> int:
        return max(0, self.memory_bytes - self.reserve_bytes)


@dataclass(frozen=True)
class LinkSpec:
    """A link between two ring neighbours. `latency_s` is one-way (half the round trip)."""

    a: str
    b: str
    bandwidth: float  # bytes/s
    latency_s: float


# Link presets. TCP over a Thunderbolt bridge: ~0.3-0.9 ms round trip; RDMA over
# Thunderbolt 5 (macOS 26.2, jaccl backend): ~5 us. Bandwidths are what a TB link
# carries in practice, not the marketing figure.
LINK_PRESETS: dict[str, tuple[float, float]] = {
    "tb-tcp": (2.5 * GB, 0.3e-3),  # (bytes/s, one-way latency)
    "tb5-rdma": (8.0 * GB, 5e-6),
    "ethernet-10g": (1.1 * GB, 0.1e-3),
    "loopback": (5.0 * GB, 30e-6),
}


def default_reserve(memory_bytes: int) -> int:
    """What to leave to macOS by default: 8 GB, or 10% of memory when that is more."""
    return max(8 * GB, memory_bytes // 10)


def node_from_chip(name: str, chip: str, memory_gb: float, reserve_gb: float | None = None) -> NodeSpec:
    if chip not in CHIPS:
        raise UserError(f"unknown chip {chip!r}; known: {', '.join(CHIPS)} (or give bandwidth_gbs)")
    c = CHIPS[chip]
    mem = int(memory_gb * GB)
    reserve = default_reserve(mem) if reserve_gb is None else int(reserve_gb * GB)
    return NodeSpec(name, mem, c.bandwidth_gbs * GB, c.fp16_tflops * 1e12, reserve, chip)


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[NodeSpec, ...]
    links: tuple[LinkSpec, ...] = ()
    default_link: str = "tb-tcp"
    efficiency: float = field(default=0.5)  # fraction of peak bandwidth decode reaches

    def link(self, a: str, b: str) -> LinkSpec:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        bw, lat = LINK_PRESETS[self.default_link]
        return LinkSpec(a, b, bw, lat)

    def node(self, name: str) -> NodeSpec:
        return next(n for n in self.nodes if n.name == name)


def cluster_from_nodes(nodes: list[NodeSpec], link: str = "tb-tcp", links: tuple[LinkSpec, ...] = (),
                       efficiency: float = 0.5) -> Cluster:
    """The entry point for `mlxdist.cluster`: discovered peers in, a Cluster out."""
    if not nodes:
        raise UserError("no nodes to place the model on")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise UserError(f"node names must be unique: {names}")
    if link not in LINK_PRESETS:
        raise UserError(f"unknown link kind {link!r}; known: {', '.join(LINK_PRESETS)}")
    return Cluster(tuple(nodes), tuple(links), link, efficiency)


def load_nodes_json(path: str | Path) -> Cluster:
    """Read nodes.json (format in docs/placement.md)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read nodes file {p}: {e}") from None
    return parse_nodes(doc, where=str(p))


def parse_nodes(doc: Any, where: str = "nodes.json") -> Cluster:
    if isinstance(doc, list):
        doc = {"nodes": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise UserError(f"{where}: expected {{\"nodes\": [...]}}")
    nodes: list[NodeSpec] = []
    for i, n in enumerate(doc["nodes"]):
        try:
            count = int(n.get("count", 1))
            for k in range(count):
                name = n.get("name", f"node{i}")
                if count > 1:
                    name = f"{name}-{k}"
                chip = n.get("chip", "generic")
                base = node_from_chip(name, chip if chip in CHIPS else "generic", float(n["memory_gb"]),
                                      n.get("reserve_gb"))
                bw = float(n["bandwidth_gbs"]) * GB if "bandwidth_gbs" in n else base.bandwidth
                flops = float(n["tflops"]) * 1e12 if "tflops" in n else base.flops
                if chip not in CHIPS and "bandwidth_gbs" not in n:
                    raise UserError(f"{where}: node {name!r}: unknown chip {chip!r} and no bandwidth_gbs")
                nodes.append(NodeSpec(name, base.memory_bytes, bw, flops, base.reserve_bytes, chip))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{where}: node #{i} is malformed ({e!r}); needs at least memory_gb") from None
    links = []
    for link in doc.get("links", []):
        try:
            links.append(LinkSpec(link["a"], link["b"], float(link["bandwidth_gbs"]) * GB,
                                  float(link["latency_us"]) * 1e-6))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: link {link!r} is malformed ({e!r})") from None
    return cluster_from_nodes(nodes, doc.get("link", "tb-tcp"), tuple(links),
                              float(doc.get("efficiency", 0.5)))
