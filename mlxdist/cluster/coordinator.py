"""What `mlxdist serve --nodes auto` and `mlxdist cluster` call: find the nodes of a
cluster (mDNS browse + authenticated status), deliver stages, launch and watch workers."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mlxdist.cluster.client import Delivery, NodeClient
from mlxdist.cluster.hardware import Interface
from mlxdist.cluster.ring import RingMember, choose_ring
from mlxdist.cluster.wire import Refused


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


__all__ = ["NodeView", "discover_nodes", "query_nodes", "deliver", "ring_order",
           "open_cluster_engine"]


def _local_addresses() -> set[str]:
    import ifaddr

    return {ip.ip for a in ifaddr.get_adapters() for ip in a.ips if isinstance(ip.ip, str)}


def order_by_plan(views: Sequence[NodeView], plan_path: str | Path, manifest: dict) -> list[NodeView]:
    """The nodes in the order a placement plan (`mlxdist plan --json`) gives its stages;
    refuses a plan whose stages are not the converted model's or whose nodes are missing."""
    from mlxdist.errors import UserError

    try:
        plan = json.loads(Path(plan_path).read_text())
        stages = plan["stages"]
        names = [st["nodes"][0] for st in stages]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UserError(f"--plan {plan_path}: not a plan from `mlxdist plan --json` ({e})")
    if any(len(st.get("nodes", [])) != 1 for st in stages):
        raise UserError(f"--plan {plan_path}: expert-parallel stages are not served on nodes yet; "
                        "plan with --strategy pipeline")
    converted = [list(st["layers"]) for st in sorted(manifest["stages"], key=lambda s: s["stage"])]
    if [list(st["layers"]) for st in stages] != converted:
        raise UserError(f"--plan {plan_path}: its layer ranges {[st['layers'] for st in stages]} are not "
                        f"the converted model's {converted}; convert with `mlxdist quantize --plan` first")
    by_name = {v.name: v for v in views}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UserError(f"--plan places stages on {', '.join(missing)}, which did not answer")
    return [by_name[n] for n in names]


def open_cluster_engine(model_path: str | Path, nodes: str = "auto", cluster: str | None = None,
                        secret_file: str | Path | None = None, browse_s: float = 3.0,
                        mdns_addresses: Sequence[str] = (), progress=None,
                        plan: str | Path | None = None, **engine_opts):
    """What `mlxdist serve MODEL --nodes auto|HOST:PORT,...` calls: find the nodes (mDNS,
    or the given list), keep those that answer an authenticated status, order them (ours
    first, then Thunderbolt links), and return a `ClusterEngine` (the runtime Engine
    interface) with every stage delivered and its worker started. Cluster name and secret
    default to $MLXDIST_CLUSTER ("default") and $MLXDIST_SECRET_FILE
    (~/.config/mlxdist/secret); $MLXDIST_MDNS_ADDRESSES (comma-separated local addresses)
    limits where mDNS runs."""
    import os
    import re

    from mlxdist.cluster.engine import ClusterEngine
    from mlxdist.cluster.secret import DEFAULT_SECRET_FILE, load_secret
    from mlxdist.errors import UserError

    say = progress or (lambda msg: None)
    path = Path(model_path).expanduser()
    if not (path / "manifest.json").is_file():
        raise UserError(f"{path}: serving on nodes needs a converted model (the output of "
                        "`mlxdist quantize`, with manifest.json and stages/)")
    cluster = cluster or os.environ.get("MLXDIST_CLUSTER", "default")
    if not mdns_addresses and os.environ.get("MLXDIST_MDNS_ADDRESSES"):  # e.g. tests, VPNs
        mdns_addresses = tuple(os.environ["MLXDIST_MDNS_ADDRESSES"].split(","))
    secret_file = secret_file or os.environ.get("MLXDIST_SECRET_FILE") or DEFAULT_SECRET_FILE
    secret, _ = load_secret(Path(secret_file), create=False)
    if nodes == "auto":
        say(f"looking for nodes of cluster {cluster!r} ...")
        views = discover_nodes(cluster, secret, browse_s=browse_s, mdns_addresses=mdns_addresses)
    else:
        targets = []
        for item in nodes.split(","):
            host, _, port = item.strip().rpartition(":")
            if not host or not port.isdigit():
                raise UserError(f"--nodes {item!r}: want auto or HOST:PORT,HOST:PORT,...")
            targets.append(([host], int(port), "", item.strip()))
        views = query_nodes(targets, cluster, secret)
    for v in views:
        if v.health != "ok":
            say(f"node {v.name or v.host} is {v.health}: {v.error}")
    ok = [v for v in views if v.health == "ok"]
    if not ok:
        raise UserError(f"no node of cluster {cluster!r} answered (run `mlxdist node` on each "
                        "Mac, with the same secret file)")
    mine = _local_addresses()
    ok.sort(key=lambda v: not any(a.split("/")[0] in mine for i in v.interfaces
                                  for a in i.addresses))
    ordered = ring_order(ok)
    if plan is not None:
        ordered = order_by_plan(ok, plan, json.loads((path / "manifest.json").read_text()))
    model = re.sub(r"[^A-Za-z0-9._-]", "-", path.resolve().name).strip(".-")[:64] or "model"
    say(f"placing {model} on {', '.join(v.name for v in ordered)} ...")
    return ClusterEngine(path, model, ordered, cluster, secret, **engine_opts)
