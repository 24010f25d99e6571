"""Launching workers: the node's validation of launch orders, ring order and addresses,
and the runtime's engine over 2 ranks started through the control plane on 127.0.0.1,
token-exact with single-process mlx-lm."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mlxdist.cluster.client import NodeClient, RemoteError
from mlxdist.cluster.hardware import Interface
from mlxdist.cluster.ring import RingMember, choose_ring, hostfile_for, link
from mlxdist.cluster.workers import LaunchError, parse_launch, worker_argv

from cluster_fixtures import (  # noqa: F401 (node: fixture)
    CLUSTER, SECRET, make_shards, node, reference_tokens, tiny_model)

GOOD = {"job": "0123abcd", "rank": 1, "hostfile": [["10.0.0.1:5000"], ["10.0.0.2:5001"]],
        "model": "tiny", "stage": 1, "backend": "ring", "layers": None,
        "control": "10.0.0.1:4000", "session": "abcdef0123456789", "max_slots": 4,
        "prefill_step": 512, "host": "mac-2"}


def held_stage(tmp_path: Path, layers: tuple[int, int], manifest: bool) -> Path:
    d = tmp_path / "shards" / "tiny" / "1"
    d.mkdir(parents=True)
    (d / "stage.json").write_text(json.dumps({"stage": 1, "layers": list(layers)}))
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 6}))
    if manifest:
        (d / "manifest.json").write_text("{}")
    return d


def test_launch_argv_is_the_runtime_worker_command(tmp_path):
    from mlxdist.runtime.worker import parse_args

    stage = held_stage(tmp_path, (2, 4), manifest=True)
    argv = worker_argv(parse_launch(GOOD), stage, Path("/data/jobs/h.json"))
    assert argv[:3] == [sys.executable, "-m", "mlxdist.runtime.worker"]
    a = parse_args(argv[3:])  # the runtime's own parser accepts it
    assert (a.rank, a.ranks, a.hostfile, a.model_dir, a.layers, a.num_layers) == \
        (1, 2, "/data/jobs/h.json", str(stage), "2:4", 6)
    assert (a.control, a.session, a.max_slots, a.prefill_step, a.host, a.shard_root) == \
        ("10.0.0.1:4000", "abcdef0123456789", 4, 512, "mac-2", str(stage))
    part = worker_argv(parse_launch({**GOOD, "layers": [3, 4]}), stage, Path("/h"))
    b = parse_args(part[3:])
    assert b.layers == "3:4" and b.shard_root == ""  # a part of a stage: no manifest check
    assert b.handoff == "messages"
    c = parse_args(worker_argv(parse_launch({**GOOD, "handoff": "collective"}), stage, Path("/h"))[3:])
    assert c.handoff == "collective"
    with pytest.raises(LaunchError, match="not in the held stage"):
        worker_argv(parse_launch({**GOOD, "layers": [1, 4]}), stage, Path("/h"))


@pytest.mark.parametrize("change", [
    {"job": "x; rm -rf /"}, {"job": 5}, {"rank": 2}, {"rank": -1}, {"rank": True},
    {"hostfile": [["10.0.0.1:5000"], ["evil.example:22"]]},
    {"hostfile": [["10.0.0.1:5000"], ["10.0.0.2:99999"]]},
    {"hostfile": [["10.0.0.1:5000"], ["10.0.0.2:1 --x"]]},
    {"hostfile": []}, {"hostfile": "10.0.0.1:5000"},
    {"backend": "ssh"}, {"model": "../../etc"}, {"stage": "1"},
    {"layers": [4, 2]}, {"layers": [0]}, {"layers": "0:2"}, {"control": "example.com:80"},
    {"control": None}, {"session": "--exec"}, {"session": "xyz"}, {"host": "a b"},
    {"host": "-x"}, {"max_slots": 0}, {"max_slots": "8"}, {"prefill_step": True},
    {"handoff": "nccl"}, {"handoff": "--exec"},
])
def test_bad_launch_orders_refused(change):
    with pytest.raises(LaunchError):
        parse_launch({**GOOD, **change})


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
            c.launch("0123abcd", 0, [["127.0.0.1:5000"]], "tiny", 0, "127.0.0.1:4000",
                     "abcdef0123456789")


def test_engine_over_two_ranks_launched_through_the_control_plane(node, tmp_path):
    """The runtime's engine, its workers started by the node (no ssh, no command line on
    the wire), answers with the same greedy tokens as single-process mlx-lm."""
    from mlxdist.cluster.coordinator import query_nodes
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
    engine = open_engine(out, ranks=2, split=[1, 3], launcher=launcher, startup_timeout_s=60)
    try:
        assert {w["rank"] for w in node.workers.summary() if w["running"]} == {0, 1}
        assert engine.generate(prompt, max_tokens=12) == expected
    finally:
        engine.close()
    assert not any(w["running"] for w in node.workers.summary())
