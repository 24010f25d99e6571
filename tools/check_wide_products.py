"""Checks runtime/wide_products.py's two product forms against the dequantized weight's
float32 product, beside the calls mlx-lm makes, on whatever device MLX runs (prints JSON;
made for MLX's CUDA backend, docs/performance.md "Decode rows as one matrix").

- MLA's per-head products (R1's sizes, 128 heads; both `transpose` settings; decode rows
  (B, H, 1, K), a batch of prompts' shared latents (B, 1, L, K), prompt rows (B, H, L, K)):
  mlx-lm's broadcast call against `heads_leading`;
- a quantized linear layer at B rows: mlx-lm's call against `rows_as_matrix`, and whether
  the two give the same bits.

Each number is the largest absolute difference over the reference's largest magnitude.

    python tools/check_wide_products.py
"""

from __future__ import annotations

import json

import mlx.core as mx

from mlxdist.runtime.wide_products import heads_leading, rows_as_matrix

from probe_qmm import BITS, GROUP, packed  # tools/: the probe's random packed weights

HEADS = 128


def rel(got: mx.array, ref: mx.array) -> float:
    return round(float(mx.max(mx.abs(got.astype(mx.float32) - ref))) / float(mx.max(mx.abs(ref))), 5)


def main() -> None:
    mx.random.seed(0)
    res: dict = {"device": str(mx.default_device()), "mlx": mx.__version__}
    for name, n, k in (("embed_q", 512, 128), ("unembed_out", 128, 512)):
        w, s, b = packed(n, k, mx.bfloat16, (HEADS,))
        full = mx.dequantize(w, s, b, group_size=GROUP, bits=BITS).astype(mx.float32)
        for transpose in (True, False):
            def prod(v: mx.array, t: bool = transpose) -> mx.array:
                return mx.quantized_matmul(v, w, s, b, transpose=t, group_size=GROUP, bits=BITS)

            for rows, h, length in ((1, HEADS, 1), (2, HEADS, 1), (4, HEADS, 1), (2, 1, 5), (4, 1, 3), (2, HEADS, 3)):
                x = (mx.random.normal((rows, h, length, k if transpose else n)) * 0.1).astype(mx.bfloat16)
                ref = x.astype(mx.float32) @ (full.swapaxes(-1, -2) if transpose else full)
                res[f"{name} t={transpose} B={rows} h={h} L={length}"] = {
                    "mlx_lm_call": rel(prod(x), ref), "heads_leading": rel(heads_leading(x, prod, HEADS), ref)}
    w, s, b = packed(7168, 2048, mx.bfloat16)
    full = mx.dequantize(w, s, b, group_size=GROUP, bits=BITS).astype(mx.float32)

    def linear(v: mx.array) -> mx.array:
        return mx.quantized_matmul(v, w, s, b, transpose=True, group_size=GROUP, bits=BITS)

    for rows in (2, 4, 5, 8, 16):
        x = (mx.random.normal((rows, 1, 2048)) * 0.1).astype(mx.bfloat16)
        ref = x.astype(mx.float32) @ full.T
        wide = rows_as_matrix(x, linear)
        res[f"linear B={rows}"] = {"mlx_lm_call": rel(linear(x), ref), "rows_as_matrix": rel(wide, ref),
                                   "bitwise_equal": bool(mx.array_equal(linear(x), wide))}
    print(json.dumps(res, indent=0))


if __name__ == "__main__":
    main()
