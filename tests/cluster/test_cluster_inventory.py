"""What a node reports becomes the planner's numbers (checked against the chip table and
the placement package's own reserve rule, written out here)."""

from mlxdist.cluster.nodes import NodeView
from mlxdist.cluster.inventory import node_spec


def view(chip: str, memory: int, bw: float = 0.0) -> NodeView:
    return NodeView(node_id="n1", name="studio", host="10.0.0.2", port=1, health="ok", chip=chip,
                    memory_total=memory, memory_available=memory // 2, bandwidth_gbs=bw)


def test_known_chip_takes_apples_figures() -> None:
    spec = node_spec(view("Apple M3 Ultra", 512 * 10**9))
    assert spec.chip == "M3 Ultra" and spec.bandwidth == 819e9
    assert spec.memory_bytes == 512 * 10**9
    assert spec.usable_bytes == 512 * 10**9 - 512 * 10**8  # 10% reserve, above 8 GB


def test_unknown_chip_uses_measured_bandwidth_and_8gb_reserve() -> None:
    spec = node_spec(view("Intel Xeon", 24 * 10**9, bw=12.5))
    assert spec.bandwidth == 12.5e9 and spec.chip == "Intel Xeon"
    assert spec.usable_bytes == 16 * 10**9


def test_plan_auto_without_a_secret_describes_this_machine(tmp_path, monkeypatch) -> None:
    from tests.conftest import run_mlxdist

    out = run_mlxdist("plan", "deepseek-r1", "--nodes", "auto", "--json", timeout=120,
                      env={"MLXDIST_SECRET_FILE": str(tmp_path / "none")})
    # this machine alone cannot hold R1: a one-line refusal naming the bytes
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "GB" in out.stderr


def test_this_machine_is_the_nodes_own_probe() -> None:
    """`mlxdist plan` with no cluster describes this machine with the probe a node
    advertises: its memory is what the OS reports, some of it reserved."""
    import os

    from mlxdist.cluster.inventory import this_machine
    from mlxdist.placement.specs import GB

    n = this_machine()
    assert n.memory_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") > GB
    assert 0 < n.usable_bytes < n.memory_bytes
    assert n.bandwidth > 0
