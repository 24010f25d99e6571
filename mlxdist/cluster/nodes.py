"""The nodes of a cluster as the coordinator sees them: `NodeView`, finding them (mDNS
browse + authenticated status), delivering stages, ring order, link kinds. Everything
above it (the launcher, the inventory, the cluster engine, `open_cluster_engine`) builds
on this module; it imports none of them."""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mlxdist.cluster.client import Delivery, NodeClient
from mlxdist.cluster.interfaces import Interface
from mlxdist.cluster.ring import RingMember, choose_ring
from mlxdist.framing import Refused


@dataclass(frozen=True)
class NodeView:
    """One node as the coordinator sees it."""
    node_id: str
    name: str
    host: str  # the address we reached its control plane on
    port: int
    health: str  # "ok" (answered an authenticated status), "refused", "unreachable"
    chip: str = ""
    memory_total: int = 0
    memory_available: int = 0
    gpu_cores: int = 0
    bandwidth_gbs: float = 0.0
    interfaces: tuple[Interface, ...] = ()
    shards: tuple[dict, ...] = ()
    peers: tuple[dict, ...] = ()
    version: str = ""
    role: str = ""  # "idle", or the ranks of the workers it runs ("rank 0,2")
    error: str = ""


def _query(host_addrs: Sequence[str], port: int, secret: bytes, cluster: str,
           timeout: float, node_id: str = "", name: str = "") -> NodeView:
    error = "no address"
    for host in host_addrs:
        try:
            with NodeClient(host, port, secret, cluster, timeout=timeout) as c:
                s = c.status()
            n = s["node"]
            ranks = [str(w["rank"]) for w in s["workers"] if w["running"]]
            role = f"rank {','.join(ranks)}" if ranks else "idle"
            return NodeView(n["node_id"], n["name"], host, port, "ok", n["chip"],
                            n["memory_total"], n["memory_available"], n["gpu_cores"],
                            n["bandwidth_gbs"],
                            tuple(Interface(i["name"], tuple(i["addresses"]), i["thunderbolt"])
                                  for i in n["interfaces"]),
                            tuple(s["shards"]), tuple(s["peers"]), n["version"], role)
        except Refused as e:
            return NodeView(node_id, name, host, port, "refused", error=str(e))
        except Exception as e:  # unreachable, timed out, garbage: try the next address
            error = f"{type(e).__name__}: {e}"
    return NodeView(node_id, name, host_addrs[0] if host_addrs else "", port, "unreachable",
                    error=error)


def discover_nodes(cluster: str, secret: bytes, browse_s: float = 2.0,
                   mdns_addresses: Sequence[str] = (), timeout: float = 2.0,
                   expect: int | None = None) -> list[NodeView]:
    """Browse mDNS for `browse_s` (or until `expect` peers are seen), then ask each node
    for its status over the authenticated control plane, in parallel."""
    from mlxdist.cluster.discovery import Discovery

    d = Discovery(cluster, mdns_addresses)
    try:
        d.start()
        deadline = time.monotonic() + browse_s
        while time.monotonic() < deadline:
            if expect is not None and len(d.peers()) >= expect:
                break
            time.sleep(0.1)
        peers = list(d.peers().values())
    finally:
        d.close()
    return query_nodes([(p.addresses, p.port, p.node_id, p.name) for p in peers],
                       cluster, secret, timeout)


def query_nodes(targets: Sequence[tuple[Sequence[str], int, str, str]], cluster: str,
                secret: bytes, timeout: float = 2.0) -> list[NodeView]:
    if not targets:
        return []
    with cf.ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        views = list(pool.map(lambda t: _query(t[0], t[1], secret, cluster, timeout, t[2], t[3]),
                              targets))
    return sorted(views, key=lambda v: (v.name, v.node_id))


def deliver(nodes: dict[str, NodeView], assignments: dict[str, Sequence[tuple[Path, str, int]]],
            cluster: str, secret: bytes, shared_paths: dict[str, str] | None = None
            ) -> list[Delivery]:
    """assignments: node_id -> [(stage_dir, model, stage)]. Nodes are served in parallel;
    `shared_paths` maps a local stage_dir to the path under which nodes can read it."""
    def one(node_id: str) -> list[Delivery]:
        v = nodes[node_id]
        out = []
        with NodeClient(v.host, v.port, secret, cluster, timeout=30) as c:
            for stage_dir, model, stage in assignments[node_id]:
                shared = (shared_paths or {}).get(str(stage_dir))
                out.append(c.deliver_stage(stage_dir, model, stage, shared_path=shared))
        return out

    with cf.ThreadPoolExecutor(max_workers=max(1, min(8, len(assignments)))) as pool:
        return [d for ds in pool.map(one, list(assignments)) for d in ds]


def ring_order(nodes: Sequence[NodeView]) -> list[NodeView]:
    """The nodes in the ring order that uses the best links (the first stays first)."""
    members = [RingMember(v.node_id, v.interfaces, fallback=v.host) for v in nodes]
    return [nodes[i] for i in choose_ring(members)]


def local_addresses() -> set[str]:
    """This machine's IP addresses (to put our own node first)."""
    import ifaddr

    return {ip.ip for a in ifaddr.get_adapters() for ip in a.ips if isinstance(ip.ip, str)}


def where(v: NodeView) -> str:
    return f"{v.name} ({v.host}:{v.port})"


def link_kind(a: NodeView, b: NodeView) -> str:
    """How `a` reaches `b`, as far as the nodes' interfaces tell."""
    if a.node_id == b.node_id or a.host.startswith("127.") or a.host in ("localhost", "::1"):
        return "loopback"
    if any(i.thunderbolt for i in a.interfaces) and any(i.thunderbolt for i in b.interfaces):
        return "thunderbolt"
    return "ethernet" if a.interfaces else "unknown"
