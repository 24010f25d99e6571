"""Launching workers: the node's validation of launch orders, ring order and addresses,
and the runtime's engine over 2 ranks started through the control plane on 127.0.0.1,
token-exact with single-process mlx-lm."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import msgpack
import pytest

from mlxdist.cluster.client import NodeClient, RemoteError
from mlxdist.cluster.interfaces import Interface
from mlxdist.cluster.ring import RingMember, choose_ring, hostfile_for, link
from mlxdist.cluster.workers import LaunchError, parse_launch, worker_spec
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.launcher import WorkerSpec

from cluster_fixtures import (  # noqa: F401 (node: fixture)
    CLUSTER, SECRET, make_shards, node, reference_tokens, tiny_model)

SESSION = "ab" * 32
SPEC = WorkerSpec(rank=1, ranks=2, hostfile="(the node's)", model_dir="/coordinator/out/stages/1", start=2,
                  end=4, num_layers=6, control="10.0.0.1:4000", session=SESSION, host="mac-2",
                  shard_root="/coordinator/out", config=EngineConfig(max_concurrent=4, prefill_step=512))


def order(fields: dict | None = None, **change) -> dict:
    """A launch order for SPEC, its blob's `fields` (config's too) and the order's own
    (`change`) changed as given."""
    fields = fields or {}
    spec = {**asdict(SPEC), **fields, "config": {**asdict(SPEC.config), **fields.get("config", {})}}
    return {"t": "launch", "job": "0123abcd", "model": "tiny", "stage": 1,
            "hostfile": [["10.0.0.1:5000"], ["10.0.0.2:5001"]], "spec": msgpack.packb(spec), **change}


def held_stage(tmp_path: Path, layers: tuple[int, int], manifest: bool,
               part: tuple[str, list[int]] | None = None) -> Path:
    """A held stage directory as a node's store has it; with `part` (node, experts), a
    node's part of an expert-parallel stage."""
    d = tmp_path / "shards" / "tiny" / "1"
    d.mkdir(parents=True)
    meta = {"format_version": 1, "stage": 1, "num_stages": 2, "layers": list(layers),
            "has_embedding": False, "has_head": False}
    if part:
        meta.update(node=part[0], experts=part[1])
    (d / "stage.json").write_text(json.dumps(meta))
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 6}))
    if manifest:
        (d / "manifest.json").write_text("{}")
    return d


def test_launch_runs_the_coordinators_spec_with_the_nodes_paths(tmp_path):
    stage = held_stage(tmp_path, (2, 4), manifest=True)
    launch = parse_launch(order())
    assert (launch.job, launch.model, launch.stage, launch.worker) == ("0123abcd", "tiny", 1, SPEC)
    w = worker_spec(launch, stage, Path("/data/jobs/h.json"))
    # only what the node knows is the node's; the rest (config included) as it was sent
    assert (w.hostfile, w.model_dir, w.shard_root) == ("/data/jobs/h.json", str(stage), str(stage))
    assert w == WorkerSpec(**{**asdict(SPEC), "config": SPEC.config, "hostfile": "/data/jobs/h.json",
                              "model_dir": str(stage), "shard_root": str(stage)})
    assert WorkerSpec.from_msgpack(w.to_msgpack()) == w  # the blob its stdin gets
    part = worker_spec(parse_launch(order({"start": 3})), stage, Path("/h"))
    assert (part.start, part.end, part.shard_root) == (3, 4, "")  # a part of a stage: no manifest check
    c = parse_launch(order({"config": {"handoff": "collective"}})).worker
    assert c.config.handoff == "collective"
    with pytest.raises(LaunchError, match="not in the held stage"):
        worker_spec(parse_launch(order({"start": 1})), stage, Path("/h"))
    with pytest.raises(LaunchError, match="has 6 layers here"):
        worker_spec(parse_launch(order({"end": 8, "num_layers": 8})), stage, Path("/h"))
    with pytest.raises(LaunchError, match="this stage holds every expert"):
        worker_spec(parse_launch(order({"config": {"expert_parallel": True}})), stage, Path("/h"))


def test_expert_parallel_rank_runs_from_the_held_part_with_its_experts(tmp_path):
    """A node's part of an expert-parallel stage runs an expert-parallel rank whose
    experts are exactly the part's (row order included), all its layers; nothing else."""
    stage = held_stage(tmp_path, (0, 6), manifest=True, part=("mac-2", [5, 6, 7]))
    ep = {"start": 0, "end": 6, "experts": [5, 6, 7], "config": {"expert_parallel": True}}
    w = worker_spec(parse_launch(order(ep)), stage, Path("/h"))
    assert (w.model_dir, w.shard_root, w.experts, w.config.expert_parallel) == (str(stage), str(stage),
                                                                                (5, 6, 7), True)
    for other in ({"experts": [5, 6]}, {"experts": [7, 6, 5]}, {"experts": []}, {"start": 1}):
        with pytest.raises(LaunchError, match="the held part holds experts"):
            worker_spec(parse_launch(order({**ep, **other})), stage, Path("/h"))
    with pytest.raises(LaunchError, match="runs only expert-parallel"):
        worker_spec(parse_launch(order({"start": 0, "end": 6})), stage, Path("/h"))
    with pytest.raises(LaunchError, match="no NCCL"):
        parse_launch(order({**ep, "nccl": "10.0.0.1:1"}))


@pytest.mark.parametrize("change,spec", [
    ({"job": "x; rm -rf /"}, None), ({"job": 5}, None), ({}, {"rank": 2}), ({}, {"rank": -1}),
    ({}, {"rank": True}), ({}, {"ranks": 3}),
    ({"hostfile": [["10.0.0.1:5000"], ["evil.example:22"]]}, None),
    ({"hostfile": [["10.0.0.1:5000"], ["10.0.0.2:99999"]]}, None),
    ({"hostfile": [["10.0.0.1:5000"], ["10.0.0.2:1 --x"]]}, None),
    ({"hostfile": []}, None), ({"hostfile": "10.0.0.1:5000"}, None),
    ({}, {"config": {"backend": "ssh"}}), ({}, {"config": {"backend": "mpi"}}),
    ({"model": "../../etc"}, None), ({"stage": "1"}, None),
    ({}, {"start": 4, "end": 2}), ({}, {"start": "0"}), ({}, {"end": None}), ({}, {"control": "example.com:80"}),
    ({}, {"control": None}), ({}, {"session": "--exec"}), ({}, {"session": "xyz"}), ({}, {"session": "abcdef012"}),
    ({}, {"host": "a b"}),
    ({}, {"host": "-x"}), ({}, {"config": {"max_concurrent": 0}}), ({}, {"config": {"max_concurrent": "8"}}),
    ({}, {"config": {"prefill_step": True}}), ({}, {"config": {"handoff": "nccl"}}),
    ({}, {"config": {"handoff": "--exec"}}), ({}, {"experts": [0, 1]}),
    ({}, {"config": {"surprise": 1}}), ({}, {"surprise": 1}), ({}, {"nccl": "10.0.0.1:1"}),
    ({"spec": b"\x91"}, None), ({"spec": "not bytes"}, None), ({"spec": None}, None),
])
def test_bad_launch_orders_refused(change, spec):
    with pytest.raises(LaunchError):
        parse_launch(order(spec, **change))


def member(nid: str, *ifaces: tuple[str, str, bool]) -> RingMember:
    return RingMember(nid, tuple(Interface(n, (a,), tb) for n, a, tb in ifaces))


def test_ring_prefers_thunderbolt_links():
    # A-B, B-C, C-D, D-A are Thunderbolt cables; everyone is also on the LAN.
    lan = lambda i: ("en0", f"192.168.1.{i}/24", False)  # noqa: E731
    a = member("a", lan(1), ("bridge0", "10.0.1.1/30", True), ("bridge1", "10.0.4.2/30", True))
    b = member("b", lan(2), ("bridge0", "10.0.1.2/30", True), ("bridge1", "10.0.2.1/30", True))
    c = member("c", lan(3), ("bridge0", "10.0.2.2/30", True), ("bridge1", "10.0.3.1/30", True))
    d = member("d", lan(4), ("bridge0", "10.0.3.2/30", True), ("bridge1", "10.0.4.1/30", True))
    assert link(a, b)[0] == 2 and link(a, c)[0] == 1
    order = choose_ring([a, c, b, d])  # given in a bad order
    names = [[a, c, b, d][i].node_id for i in order]
    assert names in (["a", "b", "c", "d"], ["a", "d", "c", "b"])
    ring = [[a, c, b, d][i] for i in order]
    hosts = hostfile_for(ring, 40000)
    assert len(hosts) == 4 and all(len(h) == 1 for h in hosts)
    assert [h[0].split(":")[1] for h in hosts] == ["40000", "40001", "40002", "40003"]


def test_ring_addresses_fall_back_to_lan():
    a = member("a", ("en0", "192.168.1.1/24", False))
    b = member("b", ("en0", "192.168.1.2/24", False))
    assert hostfile_for([a, b], 5000) == [["192.168.1.1:5000"], ["192.168.1.2:5001"]]


def test_launch_needs_a_held_stage(node):
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as c:
        with pytest.raises(RemoteError, match="holds no verified"):
            c.launch("0123abcd", "tiny", 0, [["127.0.0.1:5000"]], order({"rank": 0, "ranks": 1})["spec"])


def test_engine_over_two_ranks_launched_through_the_control_plane(node, tmp_path):
    """The runtime's engine, its workers started by the node (no ssh, no command line on
    the wire), answers with the same greedy tokens as single-process mlx-lm."""
    from mlxdist.cluster.nodes import query_nodes
    from mlxdist.cluster.launcher import ClusterLauncher, Placement
    from mlxdist.runtime.engine import open_engine

    model = tiny_model(tmp_path / "tiny", layers=4)
    out = make_shards(model, tmp_path / "out", [1, 3])
    prompt = [5, 17, 99, 3, 42, 7]
    expected = reference_tokens(model, prompt, 12)
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as c:
        for k in (0, 1):
            assert not c.deliver_stage(out / "stages" / str(k), "tiny", k).skipped
    held = node.store.stage_dir("tiny", 0)
    assert (held / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    [view] = query_nodes([(["127.0.0.1"], node.port, "", "n0")], CLUSTER, SECRET)
    launcher = ClusterLauncher([Placement(view, "tiny", 0), Placement(view, "tiny", 1)],
                               CLUSTER, SECRET)
    engine = open_engine(out, EngineConfig(startup_timeout_s=60), ranks=2, split=[1, 3], launcher=launcher)
    try:
        assert {w["rank"] for w in node.workers.summary() if w["running"]} == {0, 1}
        assert engine.generate(prompt, max_tokens=12) == expected
    finally:
        engine.close()
    assert not any(w["running"] for w in node.workers.summary())
