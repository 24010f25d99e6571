"""Which of a model's quantized products gain from runtime/wide_products.py inside the
model, at a few decode widths (prints JSON).

tools/probe_qmm.py times each dense 4-bit product of an R1-shaped step alone; in the model
the gains were smaller than its sums (docs/performance.md), and at 2 rows the padded
matrix lost. Here mlx-lm's model runs its decode step in a bare loop (as
tools/bench_gpu.py's `model_floor_ms`: prompts prefilled alone, caches merged, the next
step queued before the current tokens are read) with the wide calls switched on for one
group of modules at a time, everything else as mlx-lm calls it:

- `plain`: none (mlx-lm's calls; on CUDA MLA's broadcast per-head products are wrong from
  2 rows, but they cost what they cost);
- `all`: every quantized linear layer and MLA product, as `widen` does;
- `head`: the output head; `attn`: attention's linear projections; `mla`: MLA's per-head
  products (heads leading); `mlp`: dense MLPs and shared experts.

`--min-rows` lowers the row count from which linear layers take the padded matrix (the
runtime's MIN_ROWS) so that 2 and 3 rows can be tried (a weight of BIG_WEIGHT_BYTES or
more, a big head, takes it from 2 rows anyway).

    python tools/probe_wide.py MODEL_DIR --widths 2,4,8 --min-rows 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import mlx.core as mx
import mlx.nn as nn
from bench_gpu import model_floor_ms  # tools/: the same bare decode loop as the bench's floor
from mlx_lm import load
from mlx_lm.models.mla import QuantizedMultiLinear

from mlxdist.runtime import wide_products as wp

GROUPS = ("plain", "all", "head", "attn", "mla", "mlp")


def in_group(path: str, module: nn.Module, group: str) -> bool:
    if group == "all":
        return True
    if group == "head":
        return path == "lm_head"
    if group == "mla":
        return isinstance(module, QuantizedMultiLinear)
    if group == "attn":
        return ".self_attn." in path and not isinstance(module, QuantizedMultiLinear)
    if group == "mlp":
        return ".mlp." in path and ".switch_mlp" not in path
    return False


def switch(model: nn.Module, group: str) -> int:
    """Wide calls for the modules of `group`, mlx-lm's for every other (in place)."""
    n = 0
    for path, module in model.named_modules():
        for base, wide in wp._WIDE.items():
            if type(module) in (base, wide):
                on = group != "plain" and in_group(path, module, group)
                module.__class__ = wide if on else base
                n += on
    return n


def step_ms(model, b: int, steps: int) -> float:
    """ms per decode step of `b` rows, mlx-lm's model in a bare loop (bench_gpu's floor)."""
    return model_floor_ms(model, [[1 + (7 * i + 13 * j) % 1000 for j in range(24)] for i in range(b)], steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--widths", default="2,4,8")
    p.add_argument("--groups", default=",".join(GROUPS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2, help="rounds over all groups (their medians kept)")
    p.add_argument("--min-rows", type=int, default=wp.MIN_ROWS)
    a = p.parse_args()
    wp.MIN_ROWS = a.min_rows
    model, _ = load(a.model_dir)
    widths = [int(w) for w in a.widths.split(",")]
    groups = a.groups.split(",")
    out: dict = {"device": str(mx.default_device()), "mlx": mx.__version__, "min_rows": a.min_rows,
                 "pad_rows": wp.PAD_ROWS, "steps": a.steps, "ms_per_step": {}, "switched": {}}
    runs: dict = {}
    switch(model, "plain")
    step_ms(model, 1, 8)  # warm-up
    for _ in range(a.repeats):
        for b in widths:
            for g in groups:
                out["switched"][g] = switch(model, g)
                runs.setdefault(str(b), {}).setdefault(g, []).append(step_ms(model, b, a.steps))
                print(f"B={b} {g}: {runs[str(b)][g][-1]:.3f} ms", file=sys.stderr, flush=True)
    for b, by_group in runs.items():
        out["ms_per_step"][b] = {g: round(statistics.median(v), 3) for g, v in by_group.items()}
        plain = out["ms_per_step"][b].get("plain")
        if plain:
            out.setdefault("saved_ms_vs_plain", {})[b] = {g: round(plain - v, 3)
                                                         for g, v in out["ms_per_step"][b].items() if g != "plain"}
    out["peak_gb"] = mx.get_peak_memory() / 1e9
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
