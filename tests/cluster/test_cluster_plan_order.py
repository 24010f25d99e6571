"""plan -> shards -> nodes: a plan from `mlxdist plan --json` (uneven, memory-weighted),
a conversion cut by it (`mlxdist quantize --plan`), and serve's check of it
(`checked_plan`, then `ranks_on`): stage k runs on the node the plan named for it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mlxdist.cluster.coordinator import checked_plan
from mlxdist.cluster.engine import ranks_on
from mlxdist.cluster.inventory import Conversion
from mlxdist.cluster.nodes import NodeView
from mlxdist.errors import UserError
from mlxdist.placement.plan import Plan
from tests.conftest import ROOT, run_mlxdist


def view(name: str) -> NodeView:
    return NodeView(node_id=name, name=name, host="10.0.0.1", port=1, health="ok")


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("plan")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), "llama", str(d / "hf"),
                    "--layers", "6"], check=True, capture_output=True)
    # how much the model needs, then two nodes that each hold only part of it: one fast
    # and larger, one slow and smaller, so the split is neither trivial nor even
    def plan_on(nodes: list[dict]) -> subprocess.CompletedProcess:
        (d / "nodes.json").write_text(json.dumps({"nodes": nodes}))
        return run_mlxdist("plan", str(d / "hf"), "--nodes", str(d / "nodes.json"), "--strategy", "pipeline",
                           "--bits", "4", "--context", "16", "--concurrency", "1", "--json", timeout=120)

    out = plan_on([{"name": "probe", "chip": "M3 Ultra", "memory_gb": 512, "reserve_gb": 0}])
    assert out.returncode == 0, out.stderr
    need_gb = sum(n["weight_bytes"] + n["kv_bytes"] for n in json.loads(out.stdout)["nodes"]) / 1e9
    out = plan_on([{"name": "big", "chip": "M3 Ultra", "memory_gb": need_gb * 0.8, "reserve_gb": 0},
                   {"name": "small", "chip": "M4 Pro", "memory_gb": need_gb * 0.5, "reserve_gb": 0}])
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    (d / "plan.json").write_text(out.stdout)
    out = run_mlxdist("quantize", str(d / "hf"), str(d / "out"), "--plan", str(d / "plan.json"), timeout=300)
    assert out.returncode == 0, out.stderr
    return d, plan


def test_stages_run_where_the_plan_put_them(planned) -> None:
    d, plan = planned
    manifest = json.loads((d / "out" / "manifest.json").read_text())
    assert [st["layers"] for st in manifest["stages"]] == [st["layers"] for st in plan["stages"]]
    views = [view("small"), view("big"), view("spare")]
    chosen = checked_plan(Plan.load(d / "plan.json"), "plan.json", Conversion.load(d / "out"), views)
    assert chosen == Plan.from_json(plan)
    assert [v.name for v in ranks_on(chosen, views)] == [st["nodes"][0] for st in plan["stages"]]


def test_a_plan_naming_a_missing_node_is_refused(planned) -> None:
    d, plan = planned
    if len(plan["stages"]) < 2:
        pytest.skip("the planner put everything on one node")
    with pytest.raises(UserError, match="did not answer"):
        checked_plan(Plan.load(d / "plan.json"), "plan.json", Conversion.load(d / "out"),
                     [view(plan["stages"][0]["nodes"][0])])


def test_a_plan_for_other_layer_ranges_is_refused(planned, tmp_path) -> None:
    d, plan = planned
    manifest = json.loads((d / "out" / "manifest.json").read_text())
    other = dict(plan, stages=[{"layers": [0, 6], "nodes": ["big"]}])
    (tmp_path / "p.json").write_text(json.dumps(other))
    if [st["layers"] for st in manifest["stages"]] == [[0, 6]]:
        pytest.skip("the planner put everything on one node")
    with pytest.raises(UserError, match="not the converted model's"):
        checked_plan(Plan.load(tmp_path / "p.json"), "p.json", Conversion.load(d / "out"),
                     [view("big"), view("small")])


def test_an_expert_parallel_plan_needs_the_parts_it_was_converted_with(planned, tmp_path) -> None:
    """An expert-parallel plan runs only on a conversion holding a part for each of its
    nodes with its experts; a conversion cut into parts runs only with such a plan."""
    d, plan = planned
    ep = dict(plan, strategy="expert-parallel", stages=[{"layers": [0, 6], "nodes": ["big", "small"],
                                                         "experts": {"big": [0, 1], "small": [2, 3]}}])
    (tmp_path / "ep.json").write_text(json.dumps(ep))
    ep_plan = Plan.load(tmp_path / "ep.json")
    views = [view("big"), view("small")]
    one_stage = replace(Conversion.load(d / "out"), ranges=((0, 6),), parts=((),))
    with pytest.raises(UserError, match=r"no per-node parts.*convert with `mlxdist quantize --plan ep.json`"):
        checked_plan(ep_plan, "ep.json", one_stage, views)
    other = replace(one_stage, parts=((("big", (0, 1)), ("small", (3, 2))),))  # rows in another order
    with pytest.raises(UserError, match=r"parts for big \(2 experts\), small \(2 experts\)"):
        checked_plan(ep_plan, "ep.json", other, views)
    parts = replace(one_stage, parts=((("big", (0, 1)), ("small", (2, 3))),))
    assert checked_plan(ep_plan, "ep.json", parts, views) == ep_plan
    assert [v.name for v in ranks_on(ep_plan, [view("small"), view("big")])] == ["big", "small"]
    with pytest.raises(UserError, match="did not answer"):
        checked_plan(ep_plan, "ep.json", parts, [view("big")])
    pipeline = dict(plan, strategy="pipeline", group=["big"], stages=[{"layers": [0, 6], "nodes": ["big"]}],
                    nodes=[n for n in plan["nodes"] if n["name"] == "big"])
    (tmp_path / "p.json").write_text(json.dumps(pipeline))
    with pytest.raises(UserError, match="cut into per-node expert parts"):
        checked_plan(Plan.load(tmp_path / "p.json"), "p.json", parts, views)
