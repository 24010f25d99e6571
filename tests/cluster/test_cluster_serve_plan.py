"""`serve --nodes` places with the planner, and only with it: two in-process nodes that
report different hardware (a slow 16 GiB machine and a fast 64 GiB M3 Ultra), a tiny
model in 2 stages served over them with `open_cluster_engine`, one request at a time. The
stages run where `plan_stages` puts them for those nodes (not the ring order: for one
stream the cost model puts both on the fast node), and when that node is lost the engine
runs the planner's plan for the node left."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster_fixtures import make_shards, tiny_model

CLUSTER = "serveplan"
SECRET = "s" * 64


def start_node(tmp: Path, name: str, chip: str, memory: int):
    from mlxdist.cluster.machine import Hardware
    from mlxdist.cluster.node import Node, NodeConfig

    n = Node(NodeConfig(name=name, cluster=CLUSTER, data_dir=tmp / name, secret=SECRET.encode(), port=0,
                        bind="127.0.0.1", mdns=False),
             hardware=Hardware(chip, memory, memory // 2, 10, 100.0))
    n.start()
    return n


@pytest.fixture
def served(tmp_path):
    out = make_shards(tiny_model(tmp_path / "tiny", layers=4), tmp_path / "out", [2, 2])
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o600)
    nodes = {"nodeA": start_node(tmp_path, "nodeA", "Test Chip", 16 << 30),
             "nodeB": start_node(tmp_path, "nodeB", "Apple M3 Ultra", 64 << 30)}
    try:
        yield out, secret_file, nodes
    finally:
        for n in nodes.values():
            n.stop()


def test_serve_places_with_the_planner_first_and_after_a_loss(served):
    from mlxdist.cluster.coordinator import open_cluster_engine
    from mlxdist.cluster.inventory import Conversion
    from mlxdist.placement.planner import Request
    from mlxdist.runtime.config import EngineConfig

    out, secret_file, nodes = served
    ports = ",".join(f"127.0.0.1:{n.port}" for n in nodes.values())
    engine = open_cluster_engine(out, ports, CLUSTER, secret_file,
                                 config=EngineConfig(max_concurrent=1, startup_timeout_s=120))
    try:
        conv = Conversion.load(out)
        assert [v.name for v in engine.nodes] == ["nodeA", "nodeB"]  # the ring order
        expected = conv.plan_on(engine.nodes, conv.request(1))
        assert engine.plan == expected
        assert expected.group == ("nodeB", "nodeB")  # not the ring order (nodeA, nodeB)
        assert [v.name for v in engine.placement] == ["nodeB", "nodeB"]
        assert [st.node for st in engine.layout().stages] == ["nodeB", "nodeB"]
        assert engine.events()[0]["event"] == "placed" and expected.reason in engine.events()[0]["message"]
        assert len(engine.generate([1, 2, 3], 8)) == 8

        nodes["nodeB"].stop()  # its workers end with it; the next request meets the failure
        assert len(engine.generate([1, 2, 3], 8)) == 8
        [rec] = engine.recoveries
        assert rec["lost"] == ["nodeB"] and rec["fatal"] is None, rec
        left = [v for v in engine.nodes if v.name == "nodeA"]
        again = conv.plan_on(left, Request(context=expected.context, concurrency=expected.concurrency),
                             keep={0: "nodeB", 1: "nodeB"})
        assert engine.plan == again and again.group == ("nodeA", "nodeA")
        assert rec["group"] == ["nodeA", "nodeA"] and rec["plan"] == again.reason
        assert [v.name for v in engine.placement] == ["nodeA", "nodeA"]
    finally:
        engine.close()
