"""What `mlxdist plan` prints: counts in good English ("1 node", "1 request", "the only
plan that fits"), and a note when a node is not an Apple GPU the cost model knows."""

from __future__ import annotations

import json

from tests.conftest import run_mlxdist

NOTE = "mlxdist: note: the speeds assume Apple GPUs"


def plan(tmp_path, nodes: list[dict], *args: str):
    f = tmp_path / "nodes.json"
    f.write_text(json.dumps({"nodes": nodes}))
    return run_mlxdist("plan", "llama-3.1-70b", "--nodes", str(f), *args, timeout=60)


def test_one_node_one_request_in_the_singular(tmp_path) -> None:
    r = plan(tmp_path, [{"name": "studio", "chip": "M3 Ultra", "memory_gb": 512}], "--concurrency", "1")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "context 32768 x 1 request, links tb-tcp" in r.stdout
    assert "tok/s over 1 request (" in r.stdout
    assert "why: single over 1 node, one node holds every layer: " in r.stdout
    assert r.stdout.rstrip().endswith("at concurrency 1, the only plan that fits")
    assert "(s)" not in r.stdout and "1 requests" not in r.stdout and "1 plans" not in r.stdout
    r = plan(tmp_path, [{"name": "m", "chip": "M3 Ultra", "memory_gb": 512, "count": 2}])
    assert "x 4 requests," in r.stdout and "over 2 nodes, " in r.stdout and "the fastest of 2 plans" in r.stdout
    assert "next: single over 1 node, " in r.stdout


def test_refusal_in_the_singular(tmp_path) -> None:
    r = plan(tmp_path, [{"name": "mini", "chip": "M4 Pro", "memory_gb": 16}], "--context", "1", "--concurrency", "1")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "for 1 token x 1 request) but the nodes offer" in r.stderr


def test_a_node_that_is_no_apple_gpu_gets_a_note(tmp_path) -> None:
    """A Linux box (chip "generic": bandwidth and FLOPS guessed) or a measured CPU: the
    estimate is an Apple-GPU one, far above MLX's CPU backend (101.7 tok/s predicted where
    SmolLM2-135M ran at 5.7 on a 2-core box)."""
    r = plan(tmp_path, [{"name": "box", "chip": "generic", "memory_gb": 512}], "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["group"] == ["box"]
    assert r.stderr.splitlines() == [
        f"{NOTE}, which box (generic) is not; on MLX's CPU backend expect far less (docs/placement.md, Limits)"]
    r = plan(tmp_path, [{"name": "studio", "chip": "M3 Ultra", "memory_gb": 32},
                        {"name": "xeon", "chip": "Intel Xeon", "memory_gb": 512, "bandwidth_gbs": 50}],
             "--strategy", "pipeline")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"{NOTE}, which xeon (Intel Xeon) is not;"), r.stderr
