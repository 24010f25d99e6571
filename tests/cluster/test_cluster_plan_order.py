"""plan -> shards -> nodes: a plan from `mlxdist plan --json` (uneven, memory-weighted),
a conversion cut by it (`mlxdist quantize --plan`), and the order serve gives its nodes
(`order_by_plan`): stage k runs on the node the plan named for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlxdist.cluster.coordinator import NodeView, order_by_plan
from mlxdist.errors import UserError
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
    ordered = order_by_plan([view("small"), view("big"), view("spare")], d / "plan.json", manifest)
    assert [v.name for v in ordered] == [st["nodes"][0] for st in plan["stages"]]


def test_a_plan_naming_a_missing_node_is_refused(planned) -> None:
    d, plan = planned
    manifest = json.loads((d / "out" / "manifest.json").read_text())
    if len(plan["stages"]) < 2:
        pytest.skip("the planner put everything on one node")
    with pytest.raises(UserError, match="did not answer"):
        order_by_plan([view(plan["stages"][0]["nodes"][0])], d / "plan.json", manifest)


def test_a_plan_for_other_layer_ranges_is_refused(planned, tmp_path) -> None:
    d, plan = planned
    manifest = json.loads((d / "out" / "manifest.json").read_text())
    other = dict(plan, stages=[{"layers": [0, 6], "nodes": ["big"]}])
    (tmp_path / "p.json").write_text(json.dumps(other))
    if [st["layers"] for st in manifest["stages"]] == [[0, 6]]:
        pytest.skip("the planner put everything on one node")
    with pytest.raises(UserError, match="not the converted model's"):
        order_by_plan([view("big"), view("small")], tmp_path / "p.json", manifest)
