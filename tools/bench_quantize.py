"""Benchmark `mlxdist quantize` against `mlx_lm.convert` on the same bf16 Llama checkpoint,
in one run, each in a fresh process. Prints JSON: input GB/s and peak RSS for both, and
their ratios.

    python tools/bench_quantize.py [--layers 4 --hidden 1024 --intermediate 2816] [--repeat 1]

Two checkpoints are measured, the second with 4x the layers, to show how peak memory grows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

OURS = """
import sys, time
import mlx_lm  # imported before the clock starts, as mlx_lm.convert's own imports are
from quantize.convert import convert
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], bits=4, group_size=64, progress=False)
print(time.perf_counter() - t, open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""
MLX_LM = """
import sys, time
from mlx_lm.convert import convert
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], quantize=True, q_bits=4, q_group_size=64)
print(time.perf_counter() - t, open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def measure(script: str, src: Path, out: Path) -> dict[str, float]:
    """Seconds spent converting (imports excluded) and peak RSS (VmHWM: ru_maxrss would carry
    this parent's peak over the fork) of a fresh process. Linux only."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", script, str(src), str(out)], env=env,
                       capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    seconds, maxrss_kib = r.stdout.strip().splitlines()[-1].split()
    return {"seconds": float(seconds), "process_seconds": wall, "peak_rss_bytes": int(maxrss_kib) * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="layers of the small checkpoint (the big one has 4x)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest counts")
    a = ap.parse_args()

    import make_checkpoint

    report: dict[str, object] = {"checkpoints": []}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        for layers in (a.layers, 4 * a.layers):  # two sizes: does peak memory grow with the model?
            src = make_checkpoint.llama(Path(tmp) / f"src-{layers}", layers=layers, hidden=a.hidden,
                                        intermediate=a.intermediate, vocab=32000, heads=16, kv_heads=4, files=2)
            size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            results: dict[str, dict[str, float]] = {}
            for name, script in (("mlxdist", OURS), ("mlx_lm_convert", MLX_LM)):
                runs = [measure(script, src, Path(tmp) / f"{name}-{layers}-{i}") for i in range(a.repeat)]
                best = min(runs, key=lambda r: r["seconds"])
                best["input_gb_per_s"] = size / best["seconds"] / 1e9
                best["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
                results[name] = best
            ours, base = results["mlxdist"], results["mlx_lm_convert"]
            report["checkpoints"].append({
                "checkpoint": {"arch": "llama", "dtype": "bfloat16", "bytes": size, "layers": layers,
                               "hidden": a.hidden, "intermediate": a.intermediate},
                "mlxdist": ours,
                "mlx_lm_convert": base,
                "ratio": {
                    "input_gb_per_s_mlxdist_over_mlx_lm": ours["input_gb_per_s"] / base["input_gb_per_s"],
                    "peak_rss_mlxdist_over_mlx_lm": ours["peak_rss_bytes"] / base["peak_rss_bytes"],
                },
            })
            shutil.rmtree(src)
        small, big = report["checkpoints"]
        growth = {n: big[n]["peak_rss_bytes"] - small[n]["peak_rss_bytes"] for n in ("mlxdist", "mlx_lm_convert")}
        report["peak_rss_growth_bytes_4x_model"] = growth
        report["input_bytes_growth"] = big["checkpoint"]["bytes"] - small["checkpoint"]["bytes"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
