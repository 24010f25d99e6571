"""Fixtures for the cluster tests: an in-process node on 127.0.0.1 (no mDNS)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from mlxdist.cluster.hardware import Hardware
from mlxdist.cluster.node import Node, NodeConfig

from cluster_fixtures import CLUSTER, SECRET  # noqa: E402 (tests/cluster is on sys.path)
FAKE_HW = Hardware("Test Chip", 16 << 30, 8 << 30, 10, 100.0)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(NodeConfig(name="n0", cluster=CLUSTER, data_dir=tmp_path / "node", secret=SECRET,
                        port=0, bind="127.0.0.1", mdns=False), hardware=FAKE_HW)
    n.start()
    try:
        yield n
    finally:
        n.stop()
