"""Helpers shared by the cluster tests (imported by name: pytest puts tests/cluster on
sys.path, as the directory has no __init__.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

SECRET = b"0123456789abcdef0123456789abcdef-test-secret"
CLUSTER = "testcluster"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def node(tmp_path: Path) -> Iterator:
    """An in-process node on 127.0.0.1 with a fake hardware report and no mDNS. (Kept out
    of a conftest.py: a second module named `conftest` shadows tests/conftest.py for
    `from conftest import ...`.)"""
    from mlxdist.cluster.machine import Hardware
    from mlxdist.cluster.node import Node, NodeConfig

    n = Node(NodeConfig(name="n0", cluster=CLUSTER, data_dir=tmp_path / "node", secret=SECRET,
                        port=0, bind="127.0.0.1", mdns=False),
             hardware=Hardware("Test Chip", 16 << 30, 8 << 30, 10, 100.0))
    n.start()
    try:
        yield n
    finally:
        n.stop()


def node_process(data_dir: Path, secret_file: Path, *extra: str, name: str = "solo",
                 cluster: str = CLUSTER, port: int = 0) -> tuple[subprocess.Popen, int, str]:
    """`mlxdist node` as a user starts it (loopback, no mDNS, by default any free port):
    the process, its port and what it printed up to its startup line."""
    import re
    import threading

    p = subprocess.Popen([sys.executable, "-m", "mlxdist", "node", "--name", name,
                          "--cluster", cluster, "--port", str(port), "--bind", "127.0.0.1",
                          "--no-mdns", "--data-dir", str(data_dir), "--secret-file",
                          str(secret_file), *extra], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stderr:  # until the startup line, or the process ends
        lines.append(line)
        m = re.search(r"on port (\d+);", line)
        if m:
            threading.Thread(target=p.stderr.read, daemon=True).start()  # never blocks on its log
            return p, int(m.group(1)), "".join(lines)
    p.wait(timeout=10)
    raise AssertionError("node did not start: " + "".join(lines))


def stop_process(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=5)


def run_mlxdist(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (as tests/conftest.py's helper)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mlxdist", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def make_stage(root: Path, k: int = 0, weights_bytes: int = 3 * (1 << 20) + 12345) -> Path:
    """A stage directory laid out as docs/shard-format.md says (contents random)."""
    d = root / "stages" / str(k)
    d.mkdir(parents=True)
    (d / "stage.json").write_text(json.dumps({"format_version": 1, "stage": k, "num_stages": 2,
                                              "layers": [0, 2], "has_embedding": k == 0,
                                              "has_head": k == 1}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "vocab": list("abc")}))
    (d / "weights.safetensors").write_bytes(os.urandom(weights_bytes))
    return d


def make_shards(mlx_dir: Path, out: Path, split: list[int]) -> Path:
    """Cut an mlx-lm model directory into the shard format of docs/shard-format.md
    (stages/<k>/ + manifest.json), by tensor name, with numpy and json only."""
    import hashlib
    import re
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    config = json.loads((mlx_dir / "config.json").read_text())
    tensors: dict = {}
    for f in sorted(mlx_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    n = int(config["num_hidden_layers"])
    assert sum(split) == n
    tokenizer_files = [p for p in mlx_dir.iterdir() if p.name.startswith(("tokenizer", "special_"))
                       or p.name in ("chat_template.jinja",)]
    out.mkdir(parents=True)
    for p in tokenizer_files + [mlx_dir / "config.json"]:
        shutil.copy(p, out / p.name)
    manifest = {"format_version": 1, "source": {"path": str(mlx_dir), "kind": "tensors-sha256"},
                "options": {"stages": []}, "config": config, "stages": [], "tensors": {}}
    st_dtype = {"float32": "F32", "float16": "F16", "uint32": "U32"}
    start = 0
    for k, count in enumerate(split):
        end = start + count
        first, last = k == 0, k == len(split) - 1
        keep = {}
        for name, t in tensors.items():
            m = re.match(r"^model\.layers\.(\d+)\.", name)
            layer = int(m.group(1)) if m else None
            if (m and start <= layer < end) or (not m and (
                    (name.startswith("model.embed_tokens.") and first)
                    or (name.startswith(("model.norm.", "lm_head.")) and last))):
                keep[name] = np.ascontiguousarray(t)
                manifest["tensors"][name] = {"file": f"stages/{k}/weights.safetensors", "stage": k, "stages": [k],
                                             "layer": layer, "shape": list(t.shape),
                                             "dtype": st_dtype[str(t.dtype)], "bytes": int(t.nbytes),
                                             "sha256": hashlib.sha256(keep[name].tobytes()).hexdigest()}
        d = out / "stages" / str(k)
        d.mkdir(parents=True)
        save_file(keep, str(d / "weights.safetensors"))
        for p in tokenizer_files + [mlx_dir / "config.json"]:
            shutil.copy(p, d / p.name)
        (d / "stage.json").write_text(json.dumps({
            "format_version": 1, "stage": k, "num_stages": len(split), "layers": [start, end],
            "has_embedding": first, "has_head": last}))
        manifest["options"]["stages"].append([start, end])
        manifest["stages"].append({"stage": k, "layers": [start, end], "files": [f"stages/{k}/weights.safetensors"],
                                   "bytes": (d / "weights.safetensors").stat().st_size})
        start = end
    lines = "".join(f"{name} {t['sha256']}\n" for name, t in sorted(manifest["tensors"].items()))
    manifest["source"]["sha256"] = hashlib.sha256(lines.encode()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def tiny_model(root: Path, layers: int = 6) -> Path:
    """A tiny random llama from the runtime's tools/tiny_models.py."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    from tiny_models import make_tiny_model

    return make_tiny_model(root, "llama", layers=layers)


def reference_tokens(path: Path, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens from single-process mlx-lm: the independent reference."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(path))
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens)]
