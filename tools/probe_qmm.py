"""How a 4-bit quantized linear layer's time grows with the decode batch, for the dense
matrices of a DeepSeek-R1-shaped step (attention projections, the dense MLP, a shared
expert, the head), written several ways in one run (prints JSON).

A decode step at B rows multiplies (B, 1, K) by each weight. If the kernel reads the
weight once for all rows, time stays nearly flat in B; if it reads it per row, time grows
with B. The variants, all MLX ops on the same packed weights:

- `qmm`: `mx.quantized_matmul` on (B, 1, K), as mlx-lm's QuantizedLinear calls it;
- `flat`: the same on (1, B, K);
- `pairs`: rows two at a time, concatenated; `rows`: one at a time;
- `dequant`: `mx.dequantize` then a bf16 matmul (reads 4-bit, writes and reads bf16);
- `gather`: `mx.gather_qmm` with every row on "expert" 0, sorted (the MoE kernels' path);
- `padded` (fewer than 8 rows): the runtime's `rows_as_matrix`, zero rows added up to 8.

MLA's per-head products (mlx-lm's QuantizedMultiLinear at decode, x (B, H, 1, K) against
weights (H, N, K)) as mlx-lm broadcasts them (`qmm`) and with the heads leading
(`heads_major`: (H, B, K), each head's weight meets all B rows in one product).

Weights are random packed 4-bit words; each timed evaluation runs one product over each
of several copies (distinct weights, more bytes than the GPU's L2), and every variant's
output is checked against `qmm`'s and against the dequantized weight's float32 product.

    python tools/probe_qmm.py --rows 1,2,3,4,6,8,12,16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx

from mlxdist.runtime.wide_products import PAD_ROWS, heads_leading, rows_as_matrix

GROUP, BITS = 64, 4
# (name, out N, in K, how many of it one R1-shaped 6-layer step multiplies by)
SHAPES = [
    ("q_a", 1536, 7168, 6), ("q_b", 24576, 1536, 6), ("kv_a", 576, 7168, 6), ("o_proj", 7168, 16384, 6),
    ("dense_up", 18432, 7168, 2), ("dense_down", 7168, 18432, 1),
    ("shared_up", 2048, 7168, 10), ("shared_down", 7168, 2048, 5), ("head", 129280, 7168, 1),
]
# MLA's per-head products (mlx-lm's QuantizedMultiLinear at decode): (name, heads, N, K, per step)
MULTI = [("embed_q", 128, 512, 128, 6), ("unembed_out", 128, 128, 512, 6)]
MIN_BYTES = 600e6  # each timed evaluation reads at least this much weight (L2 is ~60 MB)


def packed(n: int, k: int, dtype: mx.Dtype, heads: tuple[int, ...] = ()) -> tuple[mx.array, mx.array, mx.array]:
    """Random packed 4-bit weights (*heads, n, k) with `dtype` scales and biases, evaluated."""
    w = mx.random.randint(0, 2 ** 31, (*heads, n, k * BITS // 32)).astype(mx.uint32)
    s = (mx.random.uniform(shape=(*heads, n, k // GROUP)) * 0.01).astype(dtype)
    b = (mx.random.uniform(shape=(*heads, n, k // GROUP)) * -0.004).astype(dtype)
    mx.eval(w, s, b)
    return w, s, b


def qmm(x, w, s, b):
    return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=GROUP, bits=BITS)


def variants(x: mx.array, wsb) -> dict:
    w, s, b = wsb
    rows = x.shape[0]
    out = {
        "qmm": lambda: qmm(x, w, s, b),
        "flat": lambda: qmm(x.reshape(1, rows, -1), w, s, b).reshape(rows, 1, -1),
        "dequant": lambda: x @ mx.dequantize(w, s, b, group_size=GROUP, bits=BITS).T,
        "gather": lambda: mx.gather_qmm(x[:, None], w[None], s[None], b[None],
                                        rhs_indices=mx.zeros((rows, 1), mx.uint32), transpose=True,
                                        group_size=GROUP, bits=BITS, sorted_indices=True)[:, 0],
    }
    if rows < PAD_ROWS:  # the runtime's own call: padded to a matrix of PAD_ROWS rows
        out["padded"] = lambda: rows_as_matrix(x, lambda v: qmm(v, w, s, b), min_rows=1)
    if rows > 2:
        out["pairs"] = lambda: mx.concatenate([qmm(x[i:i + 2], w, s, b) for i in range(0, rows, 2)])
        out["rows"] = lambda: mx.concatenate([qmm(x[i:i + 1], w, s, b) for i in range(rows)])
    return out


def multi_variants(x: mx.array, wsb) -> dict:
    """x (B, H, 1, K) against per-head weights (H, N, K): as mlx-lm broadcasts it, and with
    the heads leading (the runtime's `heads_leading`) so each head's weight meets all B rows
    in one product."""
    w, s, b = wsb
    return {"qmm": lambda: qmm(x, w, s, b),
            "heads_major": lambda: heads_leading(x, lambda v: qmm(v, w, s, b), x.shape[1])}


def time_it(fns: list, reps: int) -> float:
    """Median ms per call of one evaluation over all of `fns` (after two warm-ups)."""
    run = lambda: mx.eval([f() for f in fns])  # noqa: E731
    run()
    run()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1000 / len(fns))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,3,4,6,8,12,16")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--only", default="", help="comma-separated shape names (default: all)")
    p.add_argument("--float32", action="store_true", help="float32 activations and scales (CPU)")
    a = p.parse_args()
    dtype = mx.float32 if a.float32 else mx.bfloat16
    mx.random.seed(0)
    rows = [int(r) for r in a.rows.split(",")]
    out = {"device": str(mx.default_device()), "mlx": mx.__version__, "bits": BITS, "group_size": GROUP,
           "dtype": str(dtype), "shapes": {}}
    step = {}  # ms per R1-shaped step's dense matrices, per variant and B
    for name, heads, n, k, per_step in [(nm, 0, n, k, ps) for nm, n, k, ps in SHAPES] + MULTI:
        if a.only and name not in a.only.split(","):
            continue
        lead = (heads,) if heads else ()
        nbytes = max(1, heads) * (n * k * BITS / 8 + 2 * n * (k // GROUP) * dtype.size)
        copies = [packed(n, k, dtype, lead) for _ in range(max(2, int(MIN_BYTES // nbytes) + 1))]
        shape = {"n": n, "k": k, "heads": heads, "per_step": per_step, "copies": len(copies),
                 "weight_mb": nbytes / 1e6, "rows": {}}
        for b in rows:
            x = (mx.random.normal((b, *lead, 1, k)) * 0.1).astype(dtype)
            per = [(multi_variants if heads else variants)(x, c) for c in copies]
            ref = per[0]["qmm"]().astype(mx.float32)
            scale = float(mx.max(mx.abs(ref)))
            w, s, bias = copies[0]  # an independent reference: the dequantized weight in float32
            exact = x.astype(mx.float32) @ mx.dequantize(w, s, bias, group_size=GROUP, bits=BITS).astype(
                mx.float32).swapaxes(-1, -2)
            row = {}
            for v in per[0]:
                got = per[0][v]().astype(mx.float32).reshape(ref.shape)
                ms = time_it([d[v] for d in per], a.reps)
                row[v] = {"ms": ms, "gb_s": nbytes / ms / 1e6,
                          "max_rel_diff": float(mx.max(mx.abs(got - ref))) / max(scale, 1e-9),
                          "max_rel_vs_float32": float(mx.max(mx.abs(got - exact))) / max(scale, 1e-9)}
                step.setdefault(v, {}).setdefault(b, 0.0)
                step[v][b] += ms * per_step
            shape["rows"][str(b)] = row
            print(json.dumps({"shape": name, "B": b, **{v: round(r["ms"], 4) for v, r in row.items()}}),
                  flush=True)
        out["shapes"][name] = shape
        del copies
        mx.clear_cache()
    out["step_ms"] = {v: {str(b): round(ms, 3) for b, ms in per_b.items()} for v, per_b in step.items()}
    out["peak_gb"] = mx.get_peak_memory() / 1e9
    print(json.dumps(out))


if __name__ == "__main__":
    main()
