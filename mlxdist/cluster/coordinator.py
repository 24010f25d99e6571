"""What `mlxdist serve MODEL --nodes auto|HOST:PORT,...` calls: `open_cluster_engine`
finds the nodes (nodes.py), places the converted model's stages with the planner (the one
placer: `placement.planner.plan_stages`, through `inventory.Conversion.plan_on`) or takes
the user's `--plan` once it is checked against the conversion and the nodes that
answered, and starts a `ClusterEngine` that runs exactly that plan: pipeline stages, one
expert-parallel stage whose nodes each hold only their own experts, or a mixed plan
(pipeline stages beside one expert-parallel stage over some of the nodes)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from mlxdist.cluster.engine import ClusterEngine
from mlxdist.cluster.inventory import Conversion
from mlxdist.cluster.nodes import NodeView, discover_nodes, local_addresses, query_nodes, ring_order
from mlxdist.cluster.secret import DEFAULT_SECRET_FILE, load_secret
from mlxdist.errors import UserError
from mlxdist.placement.plan import Plan
from mlxdist.runtime.config import EngineConfig


def checked_plan(plan: Plan, where: str, conversion: Conversion, views: Sequence[NodeView]) -> Plan:
    """The user's plan (`mlxdist plan --json`), if serve can run it as it is: cut where the
    conversion was cut, on nodes that answered, and either pipeline stages (one node each,
    in rank order), one expert-parallel stage over the whole group whose nodes and experts
    are the conversion's parts (each node is sent only its part), or a mixed plan:
    pipeline stages and one expert-parallel stage over consecutive ranks after rank 0,
    whose members are the nodes of the conversion's parts for that stage (or, a
    conversion without parts, any: each member slices the stage's directory on load);
    else a one-line UserError saying which of these it is not."""
    ranges = [list(st.layers) for st in plan.stages]
    converted = [list(r) for r in conversion.ranges]
    if ranges != converted:
        raise UserError(f"--plan {where}: its layer ranges {ranges} are not the converted model's "
                        f"{converted}; convert with `mlxdist quantize --plan` first")
    if plan.kind == "expert-parallel":
        _check_expert_parts(plan, where, conversion)
    elif plan.kind == "mixed":
        _check_mixed(plan, where, conversion)
    elif conversion.expert_parallel:
        raise UserError(f"--plan {where}: the conversion is cut into per-node expert parts; serve it "
                        "with the expert-parallel or mixed plan it was converted with")
    elif plan.group != tuple(st.nodes[0] for st in plan.stages):
        raise UserError(f"--plan {where}: its group {list(plan.group)} is not its stages' nodes in rank order")
    answered = {v.name for v in views}
    missing = [n for n in dict.fromkeys(plan.group) if n not in answered]
    if missing:
        raise UserError(f"--plan places stages on {', '.join(missing)}, which did not answer")
    return plan


def _check_expert_parts(plan: Plan, where: str, conversion: Conversion) -> None:
    """An expert-parallel plan of one stage runs on nodes only over the whole group, each
    node's experts held in the part the conversion wrote for it (same nodes, same order,
    same expert ids in the same row order)."""
    if plan.stages[0].nodes != plan.group:
        raise UserError(f"--plan {where}: nodes serve a plan's one expert-parallel stage only over the whole "
                        "group")
    _check_parts(plan, 0, where, conversion, required=True)


def _check_parts(plan: Plan, k: int, where: str, conversion: Conversion, required: bool) -> None:
    """Stage `k` of `plan` is expert-parallel: the conversion's parts for it, if it has
    any (`required`: it must), are its nodes' (same nodes in the same order, each with the
    same expert ids in the same row order)."""
    stage = plan.stages[k]
    wanted = tuple((n, tuple(stage.experts_of(n))) for n in stage.nodes)
    parts = conversion.parts[k] if k < len(conversion.parts) else ()
    if parts != wanted and (parts or required):
        held = "parts for " + ", ".join(f"{n} ({len(ids)} experts)" for n, ids in parts) if parts \
            else "no per-node parts"
        raise UserError(f"--plan {where}: its expert-parallel stage is not what the conversion holds "
                        f"({held}); convert with `mlxdist quantize --plan {where}` for this plan first")


def _check_mixed(plan: Plan, where: str, conversion: Conversion) -> None:
    """A mixed plan: one expert-parallel stage after rank 0's, its members consecutive
    ranks (the runtime's layout rules, `mixed.layout_from_plan`), and parts, where the
    conversion has any, for that stage and its nodes alone."""
    from mlxdist.runtime.mixed import layout_from_plan

    try:
        layout = layout_from_plan(plan)
    except UserError as e:
        raise UserError(f"--plan {where}: {e}") from None
    k = plan.expert_parallel_stage
    if layout[0].ranks > 1:
        raise UserError(f"--plan {where}: its expert-parallel stage includes rank 0 ({plan.group[0]}), whose "
                        "coordinator runs a pipeline stage of its own")
    other = [j for j, parts in enumerate(conversion.parts) if parts and j != k]
    if other:
        raise UserError(f"--plan {where}: the conversion holds per-node expert parts for stage {other[0]}, "
                        f"not for the plan's expert-parallel stage {k}; convert with `mlxdist quantize "
                        f"--plan {where}` for this plan first")
    _check_parts(plan, k, where, conversion, required=False)


def open_cluster_engine(model_path: str | Path, nodes: str = "auto", cluster: str | None = None,
                        secret_file: str | Path | None = None, browse_s: float = 3.0,
                        mdns_addresses: Sequence[str] = (), progress=None,
                        plan: str | Path | None = None, config: EngineConfig = EngineConfig()):
    """What `mlxdist serve MODEL --nodes auto|HOST:PORT,...` calls: find the nodes (mDNS,
    or the given list), keep those that answer an authenticated status, order them (ours
    first, then Thunderbolt links), place the stages with the planner (or take `plan`, a
    plan file, once checked), and return a `ClusterEngine` (the runtime Engine interface)
    running that plan, every stage delivered and its worker started. Cluster name and secret
    default to $MLXDIST_CLUSTER ("default") and $MLXDIST_SECRET_FILE
    (~/.config/mlxdist/secret); $MLXDIST_MDNS_ADDRESSES (comma-separated local addresses)
    limits where mDNS runs."""
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
    mine = local_addresses()
    ok.sort(key=lambda v: not any(a.split("/")[0] in mine for i in v.interfaces
                                  for a in i.addresses))
    ok = ring_order(ok)
    conversion = Conversion.load(path)
    if plan is None and conversion.expert_parallel:
        raise UserError(f"{path} is cut into per-node expert parts: serve it with --plan, the "
                        "expert-parallel or mixed plan it was converted with")
    if plan is not None:
        chosen = checked_plan(Plan.load(plan), str(plan), conversion, ok)
        if chosen.kind == "mixed" and config.handoff != "messages":
            raise UserError(f"--plan {plan} is a mixed plan, which runs with --handoff messages (its "
                            "expert-parallel stage combines over neighbour links)")
    else:
        chosen = conversion.plan_on(ok, conversion.request(config.max_concurrent))
    model = re.sub(r"[^A-Za-z0-9._-]", "-", path.resolve().name).strip(".-")[:64] or "model"
    say(f"placing {model}: stages on {', '.join(chosen.group)} ({chosen.reason})")
    return ClusterEngine(path, model, ok, conversion, chosen, cluster, secret, config=config)
