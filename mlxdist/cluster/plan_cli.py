"""`mlxdist plan MODEL`: where each layer and expert goes, and how fast it should run.

The command lives in the cluster layer because `--nodes auto` asks the live cluster for
its nodes (placement itself knows only numbers)."""

from __future__ import annotations

import json

import click

from mlxdist.cluster.inventory import placement_nodes, this_machine
from mlxdist.errors import UserError
from mlxdist.placement.specs import GB, LINK_PRESETS, Cluster, cluster_from_nodes, load_nodes_json
from mlxdist.placement.model import load_model
from mlxdist.placement.planner import REQUEST_STRATEGIES, Request, plan
from mlxdist.placement.report import format_table, non_apple_note


def auto_cluster(link: str, reserve_gb: float | None) -> tuple[Cluster, str]:
    """The cluster's live nodes (mDNS and the control plane), else this machine; and a line
    saying which (the plan may use fewer nodes than were found: the user should see both)."""
    nodes = placement_nodes()
    if nodes:
        found = ", ".join(f"{n.name} ({n.chip}, {n.usable_bytes / GB:.0f} GB usable)" for n in nodes)
        return cluster_from_nodes(list(nodes), link), f"found {len(nodes)} node(s) on the cluster: {found}"
    me = this_machine(None if reserve_gb is None else int(reserve_gb * GB))
    return cluster_from_nodes([me], link), f"no cluster nodes answered: planning for this machine alone ({me.name})"


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
              type=click.Choice(list(REQUEST_STRATEGIES)))
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
        cluster, found = auto_cluster(link or "tb-tcp", reserve_gb)
        click.echo(found, err=True)
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
