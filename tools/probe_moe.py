"""How fast one DeepSeek-R1-shaped 4-bit MoE block's routed experts run at B decode rows,
written four ways, against mlx-lm's SwitchGLU in the same run (prints JSON).

mlx-lm's SwitchGLU does three `gather_qmm`s (up, gate, down), and sorts the rows by expert
first when there are at least 64 (row, expert) pairs. The variants:

- `mlx_lm`: SwitchGLU as mlx-lm runs it (the baseline);
- `sorted`: always sort; `unsorted`: never;
- `fused`: gate and up stacked into one [E, 2I, H] matrix, one `gather_qmm` for both
  (the same bytes, one kernel fewer), sorted as mlx-lm would;
- `fused_sorted`: fused, always sorted.

Weights are random packed 4-bit words, not a model's: this times kernels, not answers.
Every variant's output is checked against the baseline's on the same inputs.

    python tools/probe_moe.py --rows 1,2,4,8,16 --layers 4
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, _gather_sort, _scatter_unsort
from probe_qmm import time_it  # tools/: one timing loop for the probes

HIDDEN, INTER, EXPERTS, TOP_K, GROUP, BITS = 7168, 2048, 256, 8, 64, 4
DTYPE = [mx.bfloat16]  # float32 with --float32 (MLX's CPU gather kernels)


def random_switch_glu(hidden: int, inter: int, experts: int) -> SwitchGLU:
    """mlx-lm's SwitchGLU, quantized, with random packed 4-bit weights (no float copy is
    ever made: a small stand-in layer's arrays are replaced before anything is evaluated)."""
    glu = SwitchGLU(GROUP, GROUP, 1)
    for proj, (n, k) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
        lin = QuantizedSwitchLinear(GROUP, GROUP, 1, bias=False, group_size=GROUP, bits=BITS)
        lin.weight = mx.random.randint(0, 2 ** 31, (experts, n, k * BITS // 32)).astype(mx.uint32)
        lin.scales = (mx.random.uniform(shape=(experts, n, k // GROUP)) * 0.01).astype(DTYPE[0])
        lin.biases = (mx.random.uniform(shape=(experts, n, k // GROUP)) * -0.004).astype(DTYPE[0])
        mx.eval(lin.weight, lin.scales, lin.biases)
        setattr(glu, proj, lin)
    return glu


class Fused:
    """Gate and up as one stacked matrix: one gather_qmm reads both."""

    def __init__(self, glu: SwitchGLU):
        g, u = glu.gate_proj, glu.up_proj
        self.w = mx.concatenate([g.weight, u.weight], axis=1)
        self.s = mx.concatenate([g.scales, u.scales], axis=1)
        self.b = mx.concatenate([g.biases, u.biases], axis=1)
        mx.eval(self.w, self.s, self.b)
        self.down = glu.down_proj
        self.activation = glu.activation
        self.inter = g.weight.shape[1]

    def __call__(self, x: mx.array, indices: mx.array, sort: bool | None = None) -> mx.array:
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= 64 if sort is None else sort
        idx, inv = indices, None
        if do_sort:
            x, idx, inv = _gather_sort(x, indices)
        gu = mx.gather_qmm(x, self.w, self.s, self.b, rhs_indices=idx, transpose=True, group_size=GROUP,
                           bits=BITS, sorted_indices=do_sort)
        gate, up = gu[..., :self.inter], gu[..., self.inter:]
        x = self.down(self.activation(up, gate), idx, sorted_indices=do_sort)
        if do_sort:
            x = _scatter_unsort(x, inv, indices.shape)
        return x.squeeze(-2)


def glu_sorted(glu: SwitchGLU, x: mx.array, indices: mx.array, sort: bool) -> mx.array:
    """SwitchGLU's own forward with the sort forced on or off."""
    x = mx.expand_dims(x, (-2, -3))
    idx, inv = indices, None
    if sort:
        x, idx, inv = _gather_sort(x, indices)
    up = glu.up_proj(x, idx, sorted_indices=sort)
    gate = glu.gate_proj(x, idx, sorted_indices=sort)
    x = glu.down_proj(glu.activation(up, gate), idx, sorted_indices=sort)
    if sort:
        x = _scatter_unsort(x, inv, indices.shape)
    return x.squeeze(-2)


def time_variant(fn, layers: list, x: mx.array, idx: list[mx.array], reps: int) -> float:
    """Median ms per layer of one eval over every layer (each on its own routing)."""
    return time_it([lambda layer=layer, i=i: fn(layer, x, i) for layer, i in zip(layers, idx)], reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--layers", type=int, default=4, help="MoE blocks, each its own weights (about 6.4 GB each)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--inter", type=int, default=INTER)
    p.add_argument("--experts", type=int, default=EXPERTS)
    p.add_argument("--float32", action="store_true", help="float32 activations and scales (the CPU backend)")
    a = p.parse_args()
    if a.float32:
        DTYPE[0] = mx.float32
    mx.random.seed(0)
    glus = [random_switch_glu(a.hidden, a.inter, a.experts) for _ in range(a.layers)]
    fused = [Fused(g) for g in glus]
    variants = {
        "mlx_lm": (glus, lambda g, x, i: g(x, i)),
        "sorted": (glus, lambda g, x, i: glu_sorted(g, x, i, True)),
        "unsorted": (glus, lambda g, x, i: glu_sorted(g, x, i, False)),
        "fused": (fused, lambda f, x, i: f(x, i)),
        "fused_sorted": (fused, lambda f, x, i: f(x, i, True)),
    }
    out = {"device": str(mx.default_device()), "mlx": mx.__version__, "hidden": a.hidden, "inter": a.inter,
           "experts": a.experts, "top_k": TOP_K, "bits": BITS, "group_size": GROUP, "layers": a.layers, "rows": {}}
    for b in [int(r) for r in a.rows.split(",")]:
        x = (mx.random.normal((b, 1, a.hidden)) * 0.1).astype(DTYPE[0])
        idx = [mx.argpartition(mx.random.uniform(shape=(b, 1, a.experts)), -TOP_K, axis=-1)[..., -TOP_K:]
               .astype(mx.uint32) for _ in glus]
        ref = [g(x, i) for g, i in zip(glus, idx)]
        row = {}
        for name, (layers, fn) in variants.items():
            got = [fn(layer, x, i) for layer, i in zip(layers, idx)]
            err = max(float(mx.max(mx.abs(g.astype(mx.float32) - r.astype(mx.float32)))) for g, r in zip(got, ref))
            scale = max(float(mx.max(mx.abs(r.astype(mx.float32)))) for r in ref)
            row[name] = {"ms_per_block": time_variant(fn, layers, x, idx, a.reps), "max_abs_diff": err,
                         "ref_max_abs": scale}
        base = row["mlx_lm"]["ms_per_block"]
        for v in row.values():
            v["vs_mlx_lm"] = base / v["ms_per_block"]
        out["rows"][str(b)] = row
        print(json.dumps({"rows": b, **{k: round(v["ms_per_block"], 3) for k, v in row.items()}}), flush=True)
    out["peak_gb"] = mx.get_peak_memory() / 1e9
    print(json.dumps(out))


if __name__ == "__main__":
    main()
