"""A node running several parts of an expert-parallel stage (a survivor after a node
loss): the launch order names its first held part, the spec names them all; the node
finds the others among the model's held stages (same stage, same conversion) and accepts
experts that are exactly their stage.json experts concatenated, nothing else."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import msgpack
import pytest

from mlxdist.cluster.engine import parts_moved
from mlxdist.cluster.inventory import Conversion
from mlxdist.cluster.workers import LaunchError, parse_launch, worker_spec
from mlxdist.placement.plan import Plan

from test_cluster_launch import SPEC

EP = {"start": 0, "end": 6, "config": {"expert_parallel": True}}
COORD = "/coordinator/out/stages/0/nodes"


def order(**fields) -> dict:
    spec = {**asdict(SPEC), **EP, **fields, "config": {**asdict(SPEC.config), **EP["config"]}}
    return {"t": "launch", "job": "0123abcd", "model": "tiny", "stage": 0,
            "hostfile": [["10.0.0.1:5000"], ["10.0.0.2:5001"]], "spec": msgpack.packb(spec)}


def held_part(tmp_path: Path, key: int, node: str, experts: list[int], manifest: str = "{}") -> Path:
    """Part `node` of stage 0 held as stage `key` of model tiny, as a node's store has it."""
    d = tmp_path / "shards" / "tiny" / str(key)
    d.mkdir(parents=True)
    (d / "stage.json").write_text(json.dumps({"format_version": 1, "stage": 0, "num_stages": 1, "layers": [0, 6],
                                              "has_embedding": True, "has_head": True, "node": node,
                                              "experts": experts}))
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 6}))
    (d / "manifest.json").write_text(manifest)
    return d


def test_a_rank_runs_its_held_parts_in_the_specs_order(tmp_path):
    first = held_part(tmp_path, 0, "n0", [0, 1, 2])
    held_part(tmp_path, 1, "n1", [3, 4, 5])
    two = held_part(tmp_path, 2, "n2", [6, 7])
    parts = [f"{COORD}/n0", f"{COORD}/n2"]
    w = worker_spec(parse_launch(order(experts=[0, 1, 2, 6, 7], parts=parts)), first, Path("/h"))
    assert (w.model_dir, w.parts, w.experts, w.shard_root) == (str(first), (str(first), str(two)),
                                                               (0, 1, 2, 6, 7), str(first))
    one = worker_spec(parse_launch(order(experts=[0, 1, 2])), first, Path("/h"))  # one part: as before
    assert (one.model_dir, one.parts) == (str(first), ())
    for experts, names, match in (
            ([6, 7, 0, 1, 2], parts, "the held part holds experts"),  # not in the parts' order
            ([0, 1, 2, 6], parts, "the held part holds experts"),
            ([0, 1, 2, 6, 7], [f"{COORD}/n2", f"{COORD}/n0"], "not the spec's first part n2's"),
            ([0, 1, 2, 8, 9], [f"{COORD}/n0", f"{COORD}/n9"], "n9's part of stage 0 of this conversion is not held")):
        with pytest.raises(LaunchError, match=match):
            worker_spec(parse_launch(order(experts=experts, parts=names)), first, Path("/h"))
    with pytest.raises(LaunchError, match="parts given for a rank that is not expert-parallel"):
        parse_launch({**order(), "spec": msgpack.packb({**asdict(SPEC), "config": asdict(SPEC.config),
                                                        "parts": parts})})


def test_a_part_of_another_conversion_is_not_taken(tmp_path):
    first = held_part(tmp_path, 0, "n0", [0, 1, 2])
    held_part(tmp_path, 2, "n2", [6, 7], manifest='{"other": 1}')  # same name, another conversion
    with pytest.raises(LaunchError, match="n2's part of stage 0 of this conversion is not held here"):
        worker_spec(parse_launch(order(experts=[0, 1, 2, 6, 7], parts=[f"{COORD}/n0", f"{COORD}/n2"])),
                    first, Path("/h"))


def test_parts_of_a_plan_and_what_moved():
    from mlxdist.placement.model import LayerSpec, ModelSpec, Quant
    from mlxdist.placement.planner import Request, plan_expert_parts
    from mlxdist.placement.specs import GB, NodeSpec, cluster_from_nodes

    model = ModelSpec("m", "deepseek_v3", 64, 10, Quant(4, 64, 2),
                      (LayerSpec(0, GB, 0, GB, 0, 8 * GB, 8, 2, 0, 1, 1),), 0, 0, False)
    parts = (("n0", (0, 1, 2)), ("n1", (3, 4, 5)), ("n2", (6, 7)))
    conv = Conversion(model, ((0, 1),), (0,), 256, (parts,))
    nodes = [NodeSpec(n, 20 * GB, 1e11, 1e15, 0) for n in ("n0", "n1")]
    plan: Plan = plan_expert_parts(model, cluster_from_nodes(nodes), parts, Request(256, 1, 0.0),
                                   keep={0: "n0", 1: "n1", 2: "n2"})
    assert conv.parts_of(plan) in (((0, 2), (1,)), ((0,), (1, 2)))
    after = {i: n for n, mine in zip(plan.group, conv.parts_of(plan)) for i in mine}
    assert parts_moved(parts, {0: "n0", 1: "n1", 2: "n2"}, after) == (
        f"part of n2 (experts 6-7) moved from n2 to {after[2]}")
