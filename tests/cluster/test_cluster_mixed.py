"""A mixed plan on cluster nodes, without namespaces: which node gets which directory and
which StageLayout (`checked_plan`, `ranks_on`, `rank_shards`, `config_for`), the node's
acceptance of the runtime's own worker specs for those ranks (from the held copies of
exactly the delivered directories), the re-placement after a node loss
(`Conversion.mixed_on`) and its refusals.

The conversion is real: a tiny DeepSeek checkpoint (5 layers, 8 routed experts),
`mlxdist plan --strategy mixed` for three equal nodes, `mlxdist quantize --plan`. The
references are independent of the code under test: the manifest's parts and the runtime's
`resolve_source`, which decides from the same conversion what each rank loads."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from mlxdist.cluster.coordinator import checked_plan
from mlxdist.cluster.engine import config_for, rank_shards, ranks_lost, ranks_moved, ranks_on
from mlxdist.cluster.inventory import Conversion
from mlxdist.cluster.nodes import NodeView
from mlxdist.cluster.workers import LaunchError, parse_launch, worker_spec
from mlxdist.errors import UserError
from mlxdist.placement.plan import Plan
from mlxdist.placement.planner import Request
from mlxdist.runtime.config import EngineConfig, StageLayout
from mlxdist.runtime.launcher import WorkerSpec
from mlxdist.runtime.source import resolve_source
from mlxdist.shard_format import Manifest
from tests.conftest import ROOT, run_mlxdist

SESSION = "ab" * 32
GiB = 2 ** 30


def view(name: str, memory: int = 64 * GiB) -> NodeView:
    return NodeView(node_id=f"id-{name}", name=name, host=f"10.0.0.{int(name[1:]) + 1}", port=52415,
                    health="ok", chip="Test Chip", memory_total=memory, memory_available=memory,
                    bandwidth_gbs=100.0)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, Path, Path, dict]:
    """(the parts conversion, a conversion of the same ranges without parts, the plan
    file, the plan as JSON)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import make_checkpoint

    d = tmp_path_factory.mktemp("mixed")
    ckpt = make_checkpoint.deepseek(d / "ckpt")
    (d / "nodes.json").write_text(json.dumps({"link": "tb5-rdma", "nodes": [
        {"name": f"n{i}", "memory_gb": 16, "reserve_gb": 0, "bandwidth_gbs": 1, "tflops": 0.01} for i in range(3)]}))
    r = run_mlxdist("plan", str(ckpt), "--nodes", str(d / "nodes.json"), "--strategy", "mixed", "--context", "128",
                    "--concurrency", "8", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    plan_file = d / "mixed.json"
    plan_file.write_text(r.stdout)
    plan = json.loads(r.stdout)
    r = run_mlxdist("quantize", str(ckpt), str(d / "mixed"), "--plan", str(plan_file), "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr
    (d / "flat.json").write_text(json.dumps({"stages": [{"layers": st["layers"], "nodes": st["nodes"][:1]}
                                                        for st in plan["stages"]]}))
    r = run_mlxdist("quantize", str(ckpt), str(d / "flat"), "--plan", str(d / "flat.json"), "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr
    return d / "mixed", d / "flat", plan_file, plan


def test_the_plan_is_mixed_over_the_three_nodes(mixed):
    """What the rest relies on: the planner's mixed plan for three equal nodes, rank 0's
    stage alone, the other two nodes expert-parallel over the last layers; the
    conversion's parts are that stage's, in its ring order."""
    out, _, _, plan = mixed
    assert plan["strategy"] == "mixed" and plan["group"] == ["n0", "n1", "n2"]
    first, ep = plan["stages"]
    assert first["nodes"] == ["n0"] and ep["nodes"] == ["n1", "n2"] and ep["layers"][1] == 5
    stage = Manifest.load(out).stages[1]
    assert [(p.node, list(p.experts)) for p in stage.parts] == [(n, ep["experts"][n]) for n in ep["nodes"]]


def test_each_rank_gets_its_stage_or_its_part_and_the_plan_s_stage_layout(mixed):
    """Rank 0 (n0) its pipeline stage's directory, held as stage 0; each member its own
    part alone, held under a number of its own; the config the plan's stages, no split.
    The coordinator's runtime, from the same conversion and layout, has each rank load
    exactly the directory delivered to its node."""
    out, _, plan_file, plan = mixed
    conv = Conversion.load(out)
    views = [view("n2"), view("n0"), view("n1")]
    chosen = checked_plan(Plan.load(plan_file), "mixed.json", conv, views)
    assert [v.name for v in ranks_on(chosen, views)] == ["n0", "n1", "n2"]
    ep = plan["stages"][1]
    assert rank_shards(chosen, conv, out) == [[(out / "stages" / "0", 0)],
                                              [(out / "stages" / "1" / "nodes" / "n1", 1)],
                                              [(out / "stages" / "1" / "nodes" / "n2", 3)]]
    config = config_for(chosen, EngineConfig(max_concurrent=8))
    a, b = ep["layers"]
    assert config.stages == (StageLayout(0, a), StageLayout(a, b, 2, (tuple(ep["experts"]["n1"]),
                                                                      tuple(ep["experts"]["n2"]))))
    assert not config.expert_parallel and config.experts == ()
    source = resolve_source(out, 3, stages=config.stages)
    assert [[(p.model_dir, *p.parts)] for p in source.stages] == [
        [(d,)] for [(d, _)] in rank_shards(chosen, conv, out)]
    assert [p.shard for p in source.stages] == [True] * 3


def test_without_parts_every_member_gets_the_whole_stage(mixed):
    """A conversion cut at the plan's layers alone (no parts): both members are sent
    `stages/1/` (held as stage 1) and slice it on load; the runtime agrees."""
    _, flat, plan_file, _ = mixed
    conv = Conversion.load(flat)
    chosen = checked_plan(Plan.load(plan_file), "mixed.json", conv, [view("n0"), view("n1"), view("n2")])
    shards = rank_shards(chosen, conv, flat)
    assert shards == [[(flat / "stages" / "0", 0)], [(flat / "stages" / "1", 1)], [(flat / "stages" / "1", 1)]]
    source = resolve_source(flat, 3, stages=config_for(chosen, EngineConfig()).stages)
    assert [p.model_dir for p in source.stages] == [d for [(d, _)] in shards]


def test_plans_the_conversion_cannot_serve_are_refused(mixed, tmp_path):
    out, flat, plan_file, plan = mixed
    conv = Conversion.load(out)
    views = [view("n0"), view("n1"), view("n2")]
    # other experts for the members than the parts hold
    ep = plan["stages"][1]
    swapped = dict(plan, stages=[plan["stages"][0], dict(ep, experts={"n1": ep["experts"]["n2"],
                                                                      "n2": ep["experts"]["n1"]})])
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    with pytest.raises(UserError, match=r"not what the conversion holds \(parts for n1 \(4 experts\), n2 "
                                        r"\(4 experts\)\); convert with `mlxdist quantize --plan swapped.json`"):
        checked_plan(Plan.load(tmp_path / "swapped.json"), "swapped.json", conv, views)
    # a pipeline plan of the same ranges on a conversion cut into parts
    flat_plan = tmp_path / "pipeline.json"
    flat_plan.write_text(json.dumps({**plan, "strategy": "pipeline", "group": ["n0", "n1"],
                                     "stages": [plan["stages"][0], {"layers": ep["layers"], "nodes": ["n1"]}],
                                     "nodes": [n for n in plan["nodes"] if n["name"] in ("n0", "n1")]}))
    with pytest.raises(UserError, match="cut into per-node expert parts"):
        checked_plan(Plan.load(flat_plan), "pipeline.json", conv, views)
    # parts for another stage than the plan's expert-parallel one
    other = replace(conv, parts=(conv.parts[1], ()))
    with pytest.raises(UserError, match="parts for stage 0, not for the plan's expert-parallel stage 1"):
        checked_plan(Plan.load(plan_file), "mixed.json", other, views)
    with pytest.raises(UserError, match="n2, which did not answer"):
        checked_plan(Plan.load(plan_file), "mixed.json", conv, views[:2])
    # an expert-parallel stage holding rank 0: refused when the plan is read
    bad = dict(plan, group=["n1", "n2", "n0"], stages=[ep, dict(plan["stages"][0], nodes=["n0"])])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(UserError):
        Plan.load(tmp_path / "bad.json")


def held_copy(store: Path, key: int, src: Path, out: Path) -> Path:
    """`src` and the manifest as a node holds them after delivery (shards/<model>/<key>)."""
    d = store / "mixed" / str(key)
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("nodes"))
    shutil.copy(out / "manifest.json", d / "manifest.json")
    return d


def specs(out: Path, config: EngineConfig) -> list[WorkerSpec]:
    """The worker specs the runtime's group sends for `config` (group.py's fields)."""
    source = resolve_source(out, sum(s.ranks for s in config.stages), stages=config.stages)
    return [WorkerSpec(rank=p.rank, ranks=len(source.stages), hostfile="(the node's)", model_dir=str(p.model_dir),
                       start=p.start, end=p.end, num_layers=p.num_layers, control="10.0.0.1:4000",
                       session=SESSION, config=config, shard_root=str(source.root) if p.shard else "",
                       host=f"n{p.rank}", experts=source.experts[p.rank] if source.experts else (),
                       parts=tuple(str(d) for d in p.parts)) for p in source.stages]


def launch(spec: WorkerSpec, key: int, ranks: int = 3) -> dict:
    return {"t": "launch", "job": "0123abcd", "model": "mixed", "stage": key,
            "hostfile": [[f"10.0.0.{r + 1}:5000"] for r in range(ranks)], "spec": spec.to_msgpack()}


def test_nodes_start_each_rank_from_what_they_were_sent(mixed, tmp_path):
    """The runtime's specs for the mixed plan, each sent to the node holding the rank's
    directory as `rank_shards` says: the node runs rank 0 from its stage, each member from
    its part (its experts exactly the part's); a member's spec on another member's part,
    a part as a pipeline rank, or experts for the pipeline rank are refused."""
    out, flat, plan_file, _ = mixed
    conv = Conversion.load(out)
    plan = Plan.load(plan_file)
    config = config_for(plan, EngineConfig(max_concurrent=4))
    held = [held_copy(tmp_path / f"n{r}", key, src, out) for r, [(src, key)] in enumerate(rank_shards(plan, conv, out))]
    work = specs(out, config)
    for r, (w, d) in enumerate(zip(work, held)):
        got = worker_spec(parse_launch(launch(w, int(d.name))), d, Path("/h"))
        assert (got.model_dir, got.shard_root, got.experts, got.parts) == (str(d), str(d), w.experts, ())
        assert got.experts == (() if r == 0 else tuple(conv.parts[1][r - 1][1]))
    with pytest.raises(LaunchError, match="the held part holds experts"):
        worker_spec(parse_launch(launch(work[1], 3)), held[2], Path("/h"))  # n1's spec on n2's part
    with pytest.raises(LaunchError, match="runs only expert-parallel"):
        # a pipeline rank of the part's layers (no mixed stages in its config) on the part
        worker_spec(parse_launch(launch(replace(work[1], config=EngineConfig(max_concurrent=4), experts=()), 1)),
                    held[1], Path("/h"))
    with pytest.raises(LaunchError, match="experts given for a rank that is not expert-parallel"):
        parse_launch(launch(replace(work[0], experts=(0, 1)), 0))
    with pytest.raises(LaunchError, match="given no experts"):
        parse_launch(launch(replace(work[1], experts=()), 1))
    # without parts: each member from the whole stage, which it slices on load
    fconv = Conversion.load(flat)
    whole = held_copy(tmp_path / "flat", 1, flat / "stages" / "1", flat)
    for w in specs(flat, config)[1:]:
        got = worker_spec(parse_launch(launch(w, 1)), whole, Path("/h"))
        assert (got.model_dir, got.experts) == (str(whole), w.experts) and got.experts
    assert rank_shards(plan, fconv, flat)[1] == [(flat / "stages" / "1", 1)]


def test_a_lost_member_moves_whole_to_a_node_left(mixed):
    """n2 lost: its rank (the stage's last member, its part) goes to n0 (n1 runs the other
    member already), the stages, layers and experts unchanged, so the group is n0, n1, n0
    and n0 is sent n2's part; n1 lost: its rank goes to n0 too. Too little memory left:
    one line naming the rank, its experts and what each node has free."""
    out, _, plan_file, plan = mixed
    conv = Conversion.load(out)
    first = Plan.load(plan_file)
    req = Request(context=first.context, concurrency=first.concurrency)
    again = conv.mixed_on([view("n0"), view("n1")], req, first)
    assert again.group == ("n0", "n1", "n0") and again.strategy == "mixed"
    assert [st.layers for st in again.stages] == [st.layers for st in first.stages]
    ep = plan["stages"][1]["experts"]
    assert again.stages[1].experts == (("n1", tuple(ep["n1"])), ("n0", tuple(ep["n2"])))
    assert config_for(again, EngineConfig()).stages == config_for(first, EngineConfig()).stages
    assert rank_shards(again, conv, out)[2] == [(out / "stages" / "1" / "nodes" / "n2", 3)]
    assert "kept" in again.reason
    assert ranks_moved(first, again) == (f"rank 2 (layers {first.stages[1].layers[0]}-4, experts "
                                         f"{ep['n2'][0]}-{ep['n2'][-1]} of the expert-parallel stage 1) moved "
                                         "from n2 to n0")
    other = conv.mixed_on([view("n0"), view("n2")], req, first)
    assert other.group == ("n0", "n0", "n2")
    assert rank_shards(other, conv, out)[1] == [(out / "stages" / "1" / "nodes" / "n1", 1)]
    assert conv.mixed_on([view("n0"), view("n1"), view("n2")], req, first) == first  # nothing lost
    tiny = [view("n0", memory=int(0.3 * GiB)), view("n1", memory=int(0.3 * GiB))]
    with pytest.raises(UserError) as e:
        conv.mixed_on(tiny, req, first)
    assert "rank 2 (layers" in str(e.value) and "which no node left has" in str(e.value)
    assert "n1 runs stage 1 already" in str(e.value) and "\n" not in str(e.value)
    line = ranks_lost(first, [view("n2")], tiny, "rank 1 on n1 failed: ring peer gone", str(e.value))
    assert line.startswith("n2 (10.0.0.3:52415) lost, which ran rank 2 (layers") and "\n" not in line
    assert line.endswith("(first report: rank 1 on n1 failed: ring peer gone)")
