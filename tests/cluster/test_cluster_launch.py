"""Launching workers: the node's validation of launch orders, ring order and addresses,
and a real 2-rank MLX ring group started through the control plane on 127.0.0.1."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from mlxdist.cluster.client import NodeClient, RemoteError
from mlxdist.cluster.hardware import Interface
from mlxdist.cluster.ring import RingMember, choose_ring, hostfile_for, link
from mlxdist.cluster.workers import LaunchError, parse_launch, worker_argv

from cluster_fixtures import CLUSTER, SECRET, make_stage

GOOD = {"job": "0123abcd", "rank": 1, "hostfile": [["10.0.0.1:5000"], ["10.0.0.2:5001"]],
        "model": "tiny", "stage": 1, "backend": "ring", "options": {"seed": 3}}


def test_launch_argv_is_built_by_the_node():
    spec = parse_launch(GOOD)
    argv = worker_argv(spec, Path("/data/shards/tiny/1"), Path("/data/jobs/h.json"))
    assert argv[:3] == [sys.executable, "-m", "mlxdist.runtime.worker"]
    assert argv[3:] == ["--stage-dir", "/data/shards/tiny/1", "--rank", "1", "--world-size",
                        "2", "--hostfile", "/data/jobs/h.json", "--backend", "ring",
                        "--seed", "3"]


@pytest.mark.parametrize("change", [
    {"job": "x; rm -rf /"}, {"job": 5}, {"rank": 2}, {"rank": -1}, {"rank": True},
    {"hostfile": [["10.0.0.1:5000"], ["evil.example:22"]]},
    {"hostfile": [["10.0.0.1:5000"], ["10.0.0.2:99999"]]},
    {"hostfile": [["10.0.0.1:5000"], ["10.0.0.2:1 --x"]]},
    {"hostfile": []}, {"hostfile": "10.0.0.1:5000"},
    {"backend": "ssh"}, {"model": "../../etc"}, {"stage": "1"},
    {"options": {"command": "sh"}}, {"options": {"seed": "3"}},
    {"options": {"log_level": "--exec=x"}}, {"options": {"log_level": "a b"}},
    {"options": "seed=3"},
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
            c.launch("0123abcd", 0, [["127.0.0.1:5000"]], "tiny", 0)


def test_two_rank_ring_launched_through_the_control_plane(node, tmp_path, monkeypatch):
    monkeypatch.setenv("MLXDIST_WORKER_MODULE", "tests.cluster.fake_worker")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    out = tmp_path / "out"
    with NodeClient("127.0.0.1", node.port, SECRET, CLUSTER) as c:
        for k in (0, 1):
            c.deliver_stage(make_stage(out, k, 1000), "tiny", k)
        hosts = [[f"127.0.0.1:{p}"] for p in c.free_ports(2)]
        for rank in (0, 1):
            c.launch("feedbeef", rank, hosts, "tiny", rank, options={"seed": 5})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ranks = c.job_status("feedbeef")
            if all(r["returncode"] is not None for r in ranks):
                break
            time.sleep(0.2)
        assert [r["returncode"] for r in ranks] == [0, 0], ranks
        results = [json.loads(r["log_tail"].strip().splitlines()[-1]) for r in ranks]
        assert [(r["rank"], r["size"], r["sum"], r["stage"], r["seed"]) for r in results] == \
            [(0, 2, 3.0, 0, 5), (1, 2, 3.0, 1, 5)]
        assert c.stop_job("feedbeef") == 2
