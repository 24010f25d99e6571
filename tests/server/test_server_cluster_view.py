"""`GET /v1/cluster` and `/v1/cluster/stream` (docs/console.md) over one process, local
ranks and the fake engine: stages and layer ranges as the model was split, memory as
/proc/meminfo and the shard files say, events after a killed rank, the key rules."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mlxdist.runtime.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]


def get(url: str, key: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def stream_ticks(server, n: int) -> list[dict]:
    """The first `n` updates of the event stream, read off a raw socket."""
    out = []
    with socket.create_connection(server.address, timeout=30) as s:
        s.sendall(b"GET /v1/cluster/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        f = s.makefile("rb")
        assert b" 200 " in f.readline()
        while len(out) < n:
            line = f.readline()
            if line.startswith(b"data: "):
                out.append(json.loads(line[6:]))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("view") / "tiny", arch="llama", layers=4, seed=2)


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError


def test_the_fake_engine_and_the_key(make_server):
    server = make_server(api_key="k")
    assert get(server.url + "/v1/cluster")[0] == 401
    status, view = get(server.url + "/v1/cluster", "k")
    assert status == 200 and view["model"] == "fake" and view["health"]["status"] == "ok"
    assert view["live"]["slots"] == 4 and view["live"]["active"] == 0 and view["events"] == []


def test_stream_sends_live_numbers_every_second(make_server):
    server = make_server()
    ticks = stream_ticks(server, 2)
    assert {"live", "health", "events"} <= set(ticks[0])
    assert ticks[1]["time"] - ticks[0]["time"] >= 0.9


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="reads /proc/meminfo for the reference")
@pytest.mark.parametrize("ranks", [1, 2])
def test_layout_of_one_process_and_local_ranks(tiny, ranks):
    from mlxdist.runtime.engine import open_engine
    from mlxdist.server.app import ApiServer

    engine = open_engine(tiny, EngineConfig(in_process=ranks == 1), ranks=ranks)
    server = ApiServer(engine, "127.0.0.1", 0, quiet=True).start()
    try:
        status, view = get(server.url + "/v1/cluster")
        assert status == 200
        assert view["mode"] == ("process" if ranks == 1 else "local") and view["num_layers"] == 4
        want = [[0, 4]] if ranks == 1 else [[0, 2], [2, 4]]
        assert [st["layers"] for st in view["stages"]] == want
        (node,) = view["nodes"]
        assert node["name"] == socket.gethostname() and node["ranks"] == list(range(ranks))
        assert node["memory"]["total"] == mem_total()
        files = sum(f.stat().st_size for f in tiny.glob("*.safetensors"))
        assert abs(node["memory"]["weights"] - files) <= ranks  # the stages' shares add up to the files
        assert all(st["experts"] is None for st in view["stages"])
    finally:
        server.shutdown()
        engine.close()


def test_a_killed_rank_shows_in_the_events(tiny):
    from mlxdist.runtime.api import GenerationRequest
    from mlxdist.runtime.engine import open_engine
    from mlxdist.server.app import ApiServer

    engine = open_engine(tiny, ranks=2)
    server = ApiServer(engine, "127.0.0.1", 0, quiet=True).start()
    try:
        events = iter(engine.submit(GenerationRequest(tuple(b"on and on"), 120)))
        next(events)
        os.kill(engine._backend.launcher.procs[1].pid, signal.SIGKILL)
        assert sum(1 for ev in events if ev.token is not None) >= 1  # it finished across the restart
        deadline = time.monotonic() + 60
        while True:
            kinds = [e["event"] for e in get(server.url + "/v1/cluster")[1]["events"]]
            if "restarted" in kinds:
                break
            assert time.monotonic() < deadline, kinds
            time.sleep(0.1)
        view = get(server.url + "/v1/cluster")[1]
        assert kinds[:3] == ["restarting", "requests_healed", "restarted"], kinds
        assert "rank 1" in view["events"][0]["message"]
        assert view["health"]["status"] == "ok"
    finally:
        server.shutdown()
        engine.close()


def test_mlxdist_cluster_url_reads_the_same_view(tiny):
    """`mlxdist cluster --url` is a client of GET /v1/cluster: its table shows both
    ranks with their layers, and --json is the endpoint's object."""
    import subprocess

    from mlxdist.runtime.engine import open_engine
    from mlxdist.server.app import ApiServer

    engine = open_engine(tiny, ranks=2)
    server = ApiServer(engine, "127.0.0.1", 0, quiet=True, api_key="k").start()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        cmd = [sys.executable, "-m", "mlxdist", "cluster", "--url", server.url]
        r = subprocess.run(cmd + ["--api-key", "k"], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "rank 0: layers 0-1; rank 1: layers 2-3" in r.stdout and "ok" in r.stdout, r.stdout
        r = subprocess.run(cmd + ["--api-key", "k", "--json"], capture_output=True, text=True, env=env, timeout=60)
        assert json.loads(r.stdout)["stages"] == get(server.url + "/v1/cluster", "k")[1]["stages"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 2 and "401" in r.stderr and "--api-key" in r.stderr and "Traceback" not in r.stderr
    finally:
        server.shutdown()
        engine.close()
