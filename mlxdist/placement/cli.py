"""`mlxdist plan MODEL`: where each layer and expert goes, and how fast it should run."""

from __future__ import annotations

import json

import click

from mlxdist.errors import UserError, plural
from mlxdist.placement.hardware import CHIPS, GB, LINK_PRESETS, Cluster, cluster_from_nodes, load_nodes_json
from mlxdist.placement.model import load_model
from mlxdist.placement.plan import Plan
from mlxdist.placement.planner import Request, plan


def auto_cluster(link: str, reserve_gb: float | None) -> Cluster:
    """The cluster's live peer table when `mlxdist.cluster` offers one, else this machine."""
    try:
        from mlxdist.cluster import placement_nodes  # type: ignore[attr-defined]
    except ImportError:
        placement_nodes = None
    if placement_nodes is not None:
        nodes = placement_nodes()
        if nodes:
            return cluster_from_nodes(list(nodes), link)
    from mlxdist.placement.local_node import local_node

    return cluster_from_nodes([local_node(reserve_gb)], link)


def format_table(p: Plan) -> str:
    rows = [("rank", "node", "chip", "layers", "experts/layer", "weights GB", "KV GB", "% usable", "ms/step")]
    for ld in p.loads:
        layers = ", ".join(f"{a}-{b - 1}" for a, b in ld.layers)
        rows.append((str(p.group.index(ld.node)), ld.node, ld.chip, layers, str(ld.n_experts),
                     f"{ld.weight_bytes / GB:.1f}", f"{ld.kv_bytes / GB:.1f}", f"{100 * ld.fraction:.0f}%",
                     f"{ld.busy_ms_per_step:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    e = p.estimate
    total_w = sum(ld.weight_bytes for ld in p.loads) / GB
    total_kv = sum(ld.kv_bytes for ld in p.loads) / GB
    lines += [
        "",
        f"model {p.model} ({p.model_type}) at {p.bits} bits, context {p.context} x "
        f"{plural(p.concurrency, 'request')}, links {p.link}",
        f"strategy: {p.strategy}; memory: {total_w:.1f} GB weights + {total_kv:.1f} GB KV cache in all",
        f"decode: {e.decode_ms_per_token:.1f} ms/token alone ({e.decode_tok_s:.1f} tok/s, "
        f"{e.comm_ms_per_token:.2f} ms of it on links); {e.aggregate_tok_s:.1f} tok/s over "
        f"{plural(p.concurrency, 'request')} ({e.step_ms_at_concurrency:.1f} ms/token each); "
        f"prefill ~{e.prefill_tok_s:.0f} tok/s",
        f"why: {p.reason}",
    ]
    return "\n".join(lines)


def non_apple_note(p: Plan) -> str | None:
    """The cost model prices Apple GPUs (decode bound by memory bandwidth). For any other
    node (a Linux box: chip "generic", 100 GB/s and 1 TFLOPS guessed, or a measured CPU)
    its tok/s are far above what MLX's CPU backend runs: say so, once."""
    odd = list(dict.fromkeys(f"{ld.node} ({ld.chip})" for ld in p.loads
                             if ld.chip == "generic" or ld.chip not in CHIPS))
    if not odd:
        return None
    return (f"mlxdist: note: the speeds assume Apple GPUs, which {', '.join(odd)} "
            f"{'is' if len(odd) == 1 else 'are'} not; on MLX's CPU backend expect far less "
            f"(docs/placement.md, Limits)")


@click.command("plan")
@click.argument("model")
@click.option("--nodes", "nodes_spec", default="auto", show_default=True,
              help="'auto' (the cluster, or this machine) or a nodes.json file (docs/placement.md)")
@click.option("--context", default=32768, show_default=True, type=int, help="tokens of context per request")
@click.option("--concurrency", default=4, show_default=True, type=int, help="requests in flight")
@click.option("--bits", default=None, type=int,
              help="quantization bits, 16 = unquantized [default: the model's own, else 4]")
@click.option("--group-size", default=None, type=int, help="[default: the model's own, else 64]")
@click.option("--link", default=None, type=click.Choice(sorted(LINK_PRESETS)),
              help="link kind between nodes (default: nodes.json's, else tb-tcp)")
@click.option("--strategy", default="auto", show_default=True,
              type=click.Choice(["auto", "pipeline", "expert-parallel"]))
@click.option("--reserve-gb", default=None, type=float, help="memory left to the OS per node (auto nodes)")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def plan_command(model: str, nodes_spec: str, context: int, concurrency: int, bits: int | None,
                 group_size: int | None,
                 link: str | None, strategy: str, reserve_gb: float | None, as_json: bool) -> None:
    """Place MODEL (a config.json, a directory holding one, or a known name such as
    deepseek-r1) on the nodes and print the plan."""
    if group_size not in (None, 32, 64, 128):
        raise UserError("--group-size must be 32, 64 or 128")
    spec = load_model(model, bits=bits, group_size=group_size)
    if nodes_spec == "auto":
        cluster = auto_cluster(link or "tb-tcp", reserve_gb)
    else:
        cluster = load_nodes_json(nodes_spec)
        if link is not None:
            cluster = cluster_from_nodes(list(cluster.nodes), link, cluster.links, cluster.efficiency)

    def at_bits(b: int):
        return load_model(model, bits=b, group_size=group_size)

    p = plan(spec, cluster, Request(context=context, concurrency=concurrency, strategy=strategy),
             describe_model=at_bits)
    click.echo(json.dumps(p.to_json(), indent=2) if as_json else format_table(p))
    if (note := non_apple_note(p)) is not None:
        click.echo(note, err=True)


__all__ = ["plan_command", "auto_cluster", "format_table", "non_apple_note"]
