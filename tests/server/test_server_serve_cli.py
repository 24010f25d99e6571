"""`mlxdist serve MODEL [--local 2] --api-key K` as a user runs it: it answers the openai
client (key required), and SIGTERM/Ctrl-C stops it (status 0) with every rank gone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("mlxdist.runtime.engine", reason="the runtime engine is not merged yet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read()
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("server did not come up")


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions `text` (the server names the model path)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def worker_ranks(server_pid: int) -> dict[int, int]:
    """rank -> pid of the server's rank workers (`python -m mlxdist.runtime.worker`, its
    spec on stdin: the rank is told by the log its stdout goes to, rank<N>.log)."""
    out = {}
    for d in Path("/proc").iterdir():
        try:
            if (d.name.isdigit() and b"mlxdist.runtime.worker" in (d / "cmdline").read_bytes()
                    and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == server_pid):
                out[int(os.readlink(d / "fd" / "1").rsplit("rank", 1)[1].split(".")[0])] = int(d.name)
        except (OSError, ValueError, IndexError):
            pass
    return out


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def kill_group(proc: subprocess.Popen) -> None:
    """The server's process group, killed if any of it is left."""
    if proc.poll() is None or group_alive(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("sig,local", [(signal.SIGINT, ["--local", "2"]), (signal.SIGTERM, ["--local", "2"]),
                                       (signal.SIGTERM, ["--concurrency", "3"])])
def test_serve_with_key_then_stop(tmp_path, sig, local):
    sys.path.insert(0, str(ROOT / "tools"))
    from tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", arch="llama", layers=2, seed=1)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "mlxdist", "serve", str(model), "--port", str(port),
                             *local, "--api-key", "k3y", "--quiet"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, proc)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        c = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
        workers = []
        if Path("/proc/self/cmdline").exists():
            assert processes_mentioning(str(model)) == [proc.pid]  # the ranks' argv names nothing
            workers = worker_ranks(proc.pid)
            assert sorted(workers) == ([0, 1] if "--local" in local else [])
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert f" {3 if '--concurrency' in local else 8} at once)" in err  # the batch width
        t0 = time.monotonic()
        while group_alive(proc.pid) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert not group_alive(proc.pid)  # no rank process left behind
        if Path("/proc/self/cmdline").exists():
            assert processes_mentioning(str(model)) == []
            assert not [p for p in workers.values() if Path(f"/proc/{p}").exists()]
    finally:
        kill_group(proc)


def test_plan_concurrency_is_the_batch_width(tmp_path):
    """With --plan, the batch width is the concurrency the planner counted KV caches for."""
    from mlxdist.errors import UserError
    from mlxdist.server.cli import _plan_concurrency

    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({"nodes": [{"name": "mini", "chip": "M4 Pro", "memory_gb": 128, "count": 8}]}))
    r = subprocess.run([sys.executable, "-m", "mlxdist", "plan", "deepseek-r1", "--nodes", str(nodes),
                        "--concurrency", "6", "--json"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    plan = tmp_path / "plan.json"
    plan.write_text(r.stdout)
    assert _plan_concurrency(str(plan)) == 6
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(UserError, match="not a plan"):
        _plan_concurrency(str(tmp_path / "bad.json"))


def test_serve_a_mixed_plan_on_local_ranks(tmp_path):
    """`mlxdist serve OUT --plan mixed.json` without --nodes: the plan's stages on one local
    rank per node (rank 0 a pipeline stage, ranks 1-2 expert-parallel, each from its part of
    `mlxdist quantize --plan`), answering the openai client at temperature 0 with the text of
    mlx-lm's greedy tokens on the same model converted whole; `--local` other than the plan's
    node count is one line, before anything loads."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model, load_tokenizer

    sys.path.insert(0, str(ROOT / "tools"))
    import make_checkpoint

    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def mlxdist(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "mlxdist", *args], capture_output=True, text=True, timeout=300,
                           env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    ckpt = make_checkpoint.deepseek(tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    (tmp_path / "nodes.json").write_text(json.dumps({"link": "tb5-rdma", "nodes": [
        {"name": f"n{i}", "memory_gb": 16, "reserve_gb": 0, "bandwidth_gbs": 1, "tflops": 0.01} for i in range(3)]}))
    plan = tmp_path / "mixed.json"
    plan.write_text(mlxdist("plan", str(ckpt), "--nodes", str(tmp_path / "nodes.json"), "--strategy", "mixed",
                            "--context", "128", "--concurrency", "2", "--json"))
    stages = json.loads(plan.read_text())["stages"]
    assert [len(st["nodes"]) for st in stages] == [1, 2]
    mlxdist("quantize", str(ckpt), str(tmp_path / "out"), "--plan", str(plan), "--quiet")
    mlxdist("quantize", str(ckpt), str(tmp_path / "whole"), "--stages", "1", "--quiet")
    prompt, n = [256, 72, 101, 108, 108, 111], 8
    model, _ = load_model(tmp_path / "whole")
    expected = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n,
                                                 sampler=lambda lp: mx.argmax(lp, axis=-1))]
    detok = load_tokenizer(tmp_path / "whole").detokenizer
    detok.reset()
    for t in expected:
        detok.add_token(t)
    detok.finalize()

    r = subprocess.run([sys.executable, "-m", "mlxdist", "serve", str(tmp_path / "out"), "--plan", str(plan),
                        "--local", "2", "--port", str(free_port())], capture_output=True, text=True, timeout=120,
                       env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("mlxdist: error: --local 2, but --plan ") and "runs on 3 nodes" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlxdist", "serve", str(tmp_path / "out"), "--plan", str(plan),
                             "--port", str(port), "--quiet"], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, proc)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        got = c.completions.create(model="out", prompt=prompt, max_tokens=n, temperature=0)
        assert got.usage.completion_tokens == n and got.choices[0].text == detok.text, (got, expected)
        with urllib.request.urlopen(url + "/v1/cluster", timeout=30) as resp:
            view = json.load(resp)
        assert [st["experts"] and st["experts"]["owned"] for st in view["stages"]] == [
            None, *(stages[1]["experts"][node] for node in stages[1]["nodes"])]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and " 2 at once)" in err, err
    finally:
        kill_group(proc)
