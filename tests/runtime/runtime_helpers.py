"""Helpers and fixtures shared by the runtime tests (import the fixtures you use)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))


@functools.lru_cache(maxsize=None)
def _tiny_models() -> dict[str, Path]:
    from tiny_models import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="mlxdist-tiny-"))
    atexit.register(shutil.rmtree, root, True)
    return {
        "llama": make_tiny_model(root / "llama", "llama", layers=6),
        "deepseek_v3": make_tiny_model(root / "deepseek_v3", "deepseek_v3", layers=6),
        "qwen3": make_tiny_model(root / "qwen3", "qwen3", layers=4),
        "qwen3_moe": make_tiny_model(root / "qwen3_moe", "qwen3_moe", layers=4),
        "llama_q4": make_tiny_model(root / "llama_q4", "llama", layers=4, bits=4, seed=1),
        # MLA's head sizes a multiple of the 4-bit group, so its per-head products are quantized too
        "deepseek_v3_q4": make_tiny_model(root / "deepseek_v3_q4", "deepseek_v3", layers=4, bits=4, seed=2,
                                          overrides={"qk_nope_head_dim": 32, "v_head_dim": 32, "q_lora_rank": 64}),
        "qwen3_q4": make_tiny_model(root / "qwen3_q4", "qwen3", layers=4, bits=4, seed=3),  # a tied head
        "qwen3_moe_q4": make_tiny_model(root / "qwen3_moe_q4", "qwen3_moe", layers=4, bits=4, seed=4),
    }


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Tiny random models, written once per test process (a plain module, not a
    conftest.py: tests/conftest.py is imported as `conftest` by other tests)."""
    return _tiny_models()


def reference_tokens(path: Path, prompt: list[int], max_tokens: int, prefill_step: int = 2048) -> list[int]:
    """Greedy tokens from single-process mlx-lm: the independent reference."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(path))
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                        prefill_step_size=prefill_step)]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mlxdist", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def write_shard_dir(model_dir: Path, out: Path, bounds: list[tuple[int, int]]) -> Path:
    """A shard directory as docs/shard-format.md describes it, written here with
    safetensors + json (independent of the runtime's reader)."""
    import hashlib
    import json
    import re
    import shutil

    from safetensors.numpy import load_file, save_file

    tensors: dict = {}
    for f in sorted(model_dir.glob("model*.safetensors")):
        tensors.update(load_file(str(f)))
    config = json.loads((model_dir / "config.json").read_text())
    tied = "lm_head.weight" not in tensors
    n = len(bounds)
    st_dtype = {"float32": "F32", "float16": "F16", "uint32": "U32"}
    manifest_tensors: dict = {}
    out.mkdir(parents=True)
    for k, (a, b) in enumerate(bounds):
        stage = out / "stages" / str(k)
        stage.mkdir(parents=True)
        mine = {}
        for name, arr in tensors.items():
            m = re.match(r"model\.layers\.(\d+)\.", name)
            keep = (a <= int(m.group(1)) < b) if m else (
                (k == 0 or (k == n - 1 and tied)) if name.startswith("model.embed_tokens.")
                else k == n - 1)
            if not keep:
                continue
            mine[name] = arr
            if name in manifest_tensors:  # the tied embedding's copy on the last stage
                manifest_tensors[name]["stages"].append(k)
                continue
            manifest_tensors[name] = {"file": f"stages/{k}/weights.safetensors", "stage": k, "stages": [k],
                                      "layer": int(m.group(1)) if m else None, "shape": list(arr.shape),
                                      "dtype": st_dtype[str(arr.dtype)], "bytes": arr.nbytes,
                                      "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}
        save_file(mine, str(stage / "weights.safetensors"))
        for p in model_dir.iterdir():
            if p.suffix in (".json", ".jinja") and p.name != "model.safetensors.index.json":
                shutil.copyfile(p, stage / p.name)
                shutil.copyfile(p, out / p.name)
        (stage / "stage.json").write_text(json.dumps({
            "format_version": 1, "stage": k, "num_stages": n, "layers": [a, b],
            "has_embedding": k == 0 or (k == n - 1 and tied), "has_head": k == n - 1}))
        (out / f"model-{k + 1:05d}-of-{n:05d}.safetensors").symlink_to(f"stages/{k}/weights.safetensors")
    lines = "".join(f"{name} {t['sha256']}\n" for name, t in sorted(manifest_tensors.items()))
    (out / "manifest.json").write_text(json.dumps({
        "format_version": 1,
        "source": {"path": str(model_dir), "kind": "tensors-sha256", "sha256": hashlib.sha256(lines.encode()).hexdigest()},
        "options": {"stages": [list(bd) for bd in bounds]}, "config": config,
        "stages": [{"stage": k, "layers": list(bd), "files": [f"stages/{k}/weights.safetensors"],
                    "bytes": (out / "stages" / str(k) / "weights.safetensors").stat().st_size}
                   for k, bd in enumerate(bounds)],
        "tensors": manifest_tensors}))
    return out


def reference_top_logprobs(path: Path, prompt: list[int], max_tokens: int, k: int) -> list[list[tuple[int, float]]]:
    """Per greedy step, the k most likely tokens and their logprobs, from mlx-lm."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(path))
    out = []
    for _, logprobs in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        ids = mx.argsort(-logprobs)[:k].tolist()
        out.append([(i, logprobs[i].item()) for i in ids])
    return out


def tokens_across_a_kill(eng, rank: int, prompt: list[int], max_tokens: int, before: int) -> list[int]:
    """Generate greedily, SIGKILL worker `rank` after `before` tokens (checking it died
    mid-generation, not after) and return every token the request ends with: the engine's
    failure hook is expected to carry it over to a new group."""
    import signal

    from mlxdist.runtime.api import GenerationRequest

    pid = eng._backend.launcher.procs[rank].pid
    events = iter(eng.submit(GenerationRequest(tuple(prompt), max_tokens)))
    got = [next(events).token for _ in range(before)]
    os.kill(pid, signal.SIGKILL)
    (state,) = eng.in_flight_state()  # killed mid-generation, not after
    assert len(state["generated"]) < max_tokens
    return got + [ev.token for ev in events if ev.token is not None]


def drain_concurrently(handles: list, timeout: float = 120) -> list[list[int]]:
    """Read every request handle's tokens at once, one thread each (as concurrent clients
    would), and return them in the handles' order."""
    import threading

    out: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i, h=h: out.__setitem__(i, h.tokens()))
               for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return [out[i] for i in range(len(handles))]
