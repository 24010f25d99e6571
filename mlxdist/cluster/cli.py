"""`mlxdist node` and `mlxdist cluster`."""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
from pathlib import Path

import click

from mlxdist.errors import UserError

DEFAULT_PORT = 52415
DEFAULT_DATA_DIR = Path.home() / ".mlxdist"


def _secret(secret_file: str | None) -> bytes:
    from mlxdist.cluster.secret import DEFAULT_SECRET_FILE, load_secret

    path = Path(secret_file) if secret_file else DEFAULT_SECRET_FILE
    secret, created = load_secret(path)
    if created:
        click.echo(f"Created the cluster secret in {path} (mode 0600). Copy it to the same "
                   f"path on every other Mac of this cluster:\n  {secret.decode()}", err=True)
    return secret


@click.command("node")
@click.option("--name", default=None, help="Node name shown to others [default: hostname].")
@click.option("--cluster", default="default", show_default=True, help="Cluster name.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="Control-plane TCP port (0: any free one).")
@click.option("--data-dir", default=str(DEFAULT_DATA_DIR), show_default=True,
              type=click.Path(file_okay=False), help="Where shards and job logs live.")
@click.option("--secret-file", default=None, type=click.Path(dir_okay=False),
              help="Cluster secret [default: ~/.config/mlxdist/secret, created if missing].")
@click.option("--bind", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--interface", "interfaces", multiple=True,
              help="Only advertise these interfaces (repeatable).")
@click.option("--address", "addresses", multiple=True,
              help="Only advertise these addresses; mDNS runs on them alone (repeatable).")
@click.option("--thunderbolt", multiple=True,
              help="Mark this interface as a Thunderbolt link (found by itself on macOS).")
@click.option("--no-mdns", is_flag=True, help="Do not advertise or browse (control plane only).")
@click.option("--verbose", "-v", is_flag=True, help="Log connections and peers.")
def node_command(name: str | None, cluster: str, port: int, data_dir: str,
                 secret_file: str | None, bind: str, interfaces: tuple[str, ...],
                 addresses: tuple[str, ...], thunderbolt: tuple[str, ...], no_mdns: bool,
                 verbose: bool) -> None:
    """Run this Mac as a cluster node: advertise it, hold shards, start workers."""
    from mlxdist.cluster.interfaces import list_interfaces
    from mlxdist.cluster.node import Node, NodeConfig

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s")
    ifaces = list_interfaces(interfaces, thunderbolt, addresses)
    if (interfaces or addresses) and not ifaces:
        raise UserError("none of the given --interface/--address exist on this machine")
    config = NodeConfig(name=name or socket.gethostname().split(".")[0], cluster=cluster,
                        data_dir=Path(data_dir).expanduser(), secret=_secret(secret_file),
                        port=port, bind=bind, interfaces=ifaces, mdns=not no_mdns,
                        mdns_addresses=tuple(addresses))
    node = Node(config)
    try:
        node.start()
    except OSError as e:
        raise UserError(f"cannot listen on {bind}:{port}: {e.strerror or e}") from None
    signal.signal(signal.SIGTERM, lambda *_: node.request_stop())
    links = ", ".join(f"{i.name} {' '.join(i.addresses)}{' (thunderbolt)' if i.thunderbolt else ''}"
                      for i in ifaces) or "no interfaces"
    click.echo(f"mlxdist node {config.name} ({node.node_id}) in cluster {cluster!r} on port "
               f"{node.port}; {node.hardware.chip}, {node.hardware.memory_total / 2**30:.1f} GiB, "
               f"{node.hardware.bandwidth_gbs} GB/s; {links}", err=True)
    try:
        node.wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()


def _row(v) -> dict:
    return {"name": v.name, "node_id": v.node_id, "address": f"{v.host}:{v.port}",
            "chip": v.chip, "memory_gib": round(v.memory_total / 2**30, 1),
            "available_gib": round(v.memory_available / 2**30, 1), "gpu_cores": v.gpu_cores,
            "bandwidth_gbs": v.bandwidth_gbs,
            "links": [{"interface": i.name, "addresses": list(i.addresses),
                       "thunderbolt": i.thunderbolt} for i in v.interfaces],
            "shards": [f"{s['model']}/{s['stage']}" for s in v.shards],
            "held_bytes": sum(int(s.get("bytes") or 0) for s in v.shards),
            "shard_bytes": {f"{s['model']}/{s['stage']}": int(s.get("bytes") or 0) for s in v.shards},
            "health": v.health, "role": v.role, "error": v.error,
            "peers": [{"name": p.get("name", ""), "node_id": p["node_id"],
                       "health": p["health"]} for p in v.peers]}


@click.command("cluster")
@click.option("--cluster", default="default", show_default=True, help="Cluster name.")
@click.option("--secret-file", default=None, type=click.Path(dir_okay=False),
              help="Cluster secret [default: ~/.config/mlxdist/secret].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--browse", default=2.0, show_default=True, type=click.FloatRange(0.1, 60),
              help="Seconds to listen for mDNS announcements.")
@click.option("--address", "addresses", multiple=True,
              help="Run mDNS only on these local addresses (repeatable).")
@click.option("--node", "nodes", multiple=True,
              help="Also ask this node directly, as HOST:PORT (repeatable).")
@click.option("--no-mdns", is_flag=True, help="Only ask the --node addresses.")
@click.option("--url", default=None, help="Ask a running `mlxdist serve` at URL (its GET /v1/cluster) instead: "
                                          "the nodes, the stages and layers each runs, live numbers, events.")
@click.option("--api-key", default=None, envvar="MLXDIST_API_KEY", help="With --url: the server's API key.")
def cluster_command(cluster: str, secret_file: str | None, as_json: bool, browse: float,
                    addresses: tuple[str, ...], nodes: tuple[str, ...], no_mdns: bool,
                    url: str | None = None, api_key: str | None = None) -> None:
    """Show the nodes of a cluster: chip, memory, links, shards (and the bytes held),
    health, role."""
    if url:
        return _served_cluster(url, api_key, as_json)
    from mlxdist.cluster.nodes import discover_nodes, query_nodes
    from mlxdist.cluster.secret import DEFAULT_SECRET_FILE, load_secret

    secret, _ = load_secret(Path(secret_file) if secret_file else DEFAULT_SECRET_FILE,
                            create=False)
    targets = []
    for n in nodes:
        host, _, port = n.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--node {n!r}: want HOST:PORT")
        targets.append(([host], int(port), "", n))
    views = query_nodes(targets, cluster, secret) if targets else []
    if not no_mdns:
        views += discover_nodes(cluster, secret, browse_s=browse, mdns_addresses=addresses)
    seen, unique = set(), []
    for v in views:
        key = v.node_id or f"{v.host}:{v.port}"
        if key not in seen:
            seen.add(key)
            unique.append(v)
    # a node its peers' heartbeats call lost is lost even when mDNS still lists it
    lost = {p["node_id"] for v in unique for p in v.peers if p["health"] == "lost"}
    rows = [_row(v) for v in unique]
    for r in rows:
        if r["health"] == "ok" and r["node_id"] in lost:
            r["health"] = "lost-by-peers"
    if as_json:
        click.echo(json.dumps({"cluster": cluster, "nodes": rows}, indent=2))
        return
    if not rows:
        click.echo(f"no nodes found in cluster {cluster!r}")
        return
    header = ["NAME", "CHIP", "MEMORY", "LINKS", "SHARDS", "HELD", "HEALTH", "ROLE"]
    table = [header] + [[
        r["name"], r["chip"][:28], f"{r['available_gib']}/{r['memory_gib']} GiB",
        " ".join(f"{l['interface']}{'(tb)' if l['thunderbolt'] else ''}" for l in r["links"]),
        str(len(r["shards"])), _size(r["held_bytes"]), r["health"], r["role"]] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _size(n: int) -> str:
    """Bytes for people: '0 B', '812 KiB', '1.4 GiB' (a node's held shards)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 100 * scale else f"{n // scale} {unit}"
    return f"{n} B"


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f}"


def _served_cluster(url: str, api_key: str | None, as_json: bool) -> None:
    """The cluster as a running server sees it (GET /v1/cluster, docs/console.md)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url.rstrip("/") + "/v1/cluster",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            view = json.load(r)
    except urllib.error.HTTPError as e:
        raise UserError(f"{url} answered {e.code}" + (" (give --api-key)" if e.code == 401 else ""))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot ask {url}: {getattr(e, 'reason', e)}")
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    h = view["health"]
    click.echo(f"{view['model']} ({view['mode']}), {h['status']}" + (f": {h['reason']}" if h["reason"] else ""))
    rows = [["NODE", "CHIP", "MEMORY GiB (weights/kv/free/total)", "LINKS", "HEALTH", "STAGES"]]
    for n in view["nodes"]:
        m = n["memory"]
        stages = [f"rank {st['rank']}: layers {st['layers'][0]}-{st['layers'][1] - 1}"
                  + (f" ({len(st['experts']['owned'])} of {st['experts']['total']} experts)" if st["experts"] else "")
                  for st in view["stages"] if st["node"] == n["name"]]
        rows.append([n["name"], n["chip"][:24], "/".join(_gb(m[k]) for k in ("weights", "kv_cache", "free", "total")),
                     " ".join(f"{l['to']}({l['kind']})" for l in n["links"]) or "-", n["health"],
                     "; ".join(stages) or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    live = view["live"]
    click.echo(f"live: {live['tokens_per_second']:.1f} tok/s, {live['active']}/{live['slots']} slots busy, "
               f"{live['queued']} queued, prefix-cache hits {live['prefix_cache_hit_tokens']} tokens")
    for e in view["events"][-5:]:
        stamp = time.strftime("%H:%M:%S", time.localtime(e["t"]))
        click.echo(f"{stamp} {e['event']}: {e['message']}")
