"""Decode rows as one matrix in quantized products, where the backend needs it.

A batched decode step multiplies x of shape (B, 1, K) by every weight (B rows of one
token each). MLX's CUDA backend (0.32) treats the leading B as a batch of B separate
matrix-vector products and reads the 4-bit weight once per row, so the step's dense
matrices cost B times one row's; given the same rows as one (1, B, K) matrix with at least
8 rows it takes its matrix kernel, which reads the weight once for all of them, and gives
the same bits. Measured on an H200 (tools/probe_qmm.py, docs/performance.md): R1's
129k-token head at 16 rows 6.12 ms as mlx-lm calls it, 0.52 ms as one matrix; 4 to 7 rows
(2.1-3.1 ms at 4-6) are padded to 8 with zero rows (0.46 ms), which leave the real rows
alone. From 8 rows the results are mlx-lm's bits; at 4-7 rows they are the matrix
kernel's rounding instead (0.23 % from the float32 product, mlx-lm's call 0.32 %:
tools/check_wide_products.py).
One sequence's own call ((1, L, K): a lone decode row, a prompt chunk) is left as mlx-lm
makes it, so a lone sequence runs mlx-lm's kernels bit for bit; so are 2 or 3 rows, except
against a weight of BIG_WEIGHT_BYTES or more (a big model's head): for the others the
padded matrix cost more than it saved there, measured in the model (tools/probe_wide.py).

MLA's per-head products (mlx-lm's QuantizedMultiLinear: x (B, H, L, K) against weights
(H, N, K)) go the other way round: with the heads leading, (H, B*L, K), each head's
weight meets all rows of the batch in one product. There this is also a fix: on MLX 0.32's
CUDA backend the broadcast form gives wrong results from B = 2, decode rows and batched
prompts alike (relative error 0.8-1.4 against the dequantized weight's float32 product,
where the heads-leading form is within 0.4 %: tools/check_wide_products.py), so mlx-lm's
DeepSeek-V3/R1 attention computes batched rows wrongly on CUDA.

`widen(model)` switches the model's quantized linear layers, a tied head's embedding and
MLA's per-head products to these calls. Metal and the CPU backend treat every leading row
as one matrix already, so there nothing changes (`reads_weights_per_row` is False); the
CPU computes the broadcast per-head form right, and Metal's is not measured here
(tools/check_wide_products.py on a Mac says). MLXDIST_WIDE_PRODUCTS=1 or 0 forces it
either way (tests, A/B runs).
"""

from __future__ import annotations

import os
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.mla import QuantizedMultiLinear

PAD_ROWS = 8  # the fewest rows MLX's CUDA quantized product serves with its matrix kernel
# Fewer rows than this keep mlx-lm's call: at 2 rows the padded matrix lost to it in the
# model (316.7 against 355.6 tok/s, same run), at 4 it won (1.21 x mlx-lm, two runs)
MIN_ROWS = 4
# ... except a weight this big, from 2 rows: padding adds a few small dependent kernels to
# every product (pad, slice), which one read of a big weight outweighs at any width. In
# the model (tools/probe_wide.py, H200), R1's 0.46 GB head padded at 2 rows saved 0.26 and
# 0.57 ms per step (two machines), at 3 rows 1.09 ms; at 2 rows its attention projections
# and its MLPs (6-66 MB each) lost 0.95 and 0.40 ms.
BIG_WEIGHT_BYTES = 128e6
ENV = "MLXDIST_WIDE_PRODUCTS"


def reads_weights_per_row() -> bool:
    """Whether this process's quantized products read a weight once per leading row:
    MLX's CUDA backend on the GPU."""
    forced = os.environ.get(ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    cuda = getattr(mx, "cuda", None)  # MLX builds bind it everywhere (a stub off CUDA); never fail a load on it
    return mx.default_device() == mx.gpu and cuda is not None and cuda.is_available()


def rows_as_matrix(x: mx.array, product: Callable[[mx.array], mx.array], min_rows: int | None = None) -> mx.array:
    """`product(x)` for x of shape (B, ..., K), computed on all its rows as one (1, rows, K)
    matrix of at least PAD_ROWS rows (zero rows added, their results dropped). One
    sequence's call (B = 1), and fewer than `min_rows` rows (MIN_ROWS), are left as they are."""
    rows = x.size // x.shape[-1]
    if x.ndim < 3 or x.shape[0] == 1 or rows < (MIN_ROWS if min_rows is None else min_rows):
        return product(x)
    flat = x.reshape(1, rows, x.shape[-1])
    if rows < PAD_ROWS:
        flat = mx.pad(flat, [(0, 0), (0, PAD_ROWS - rows), (0, 0)])
    y = product(flat)
    return y[:, :rows].reshape(*x.shape[:-1], y.shape[-1])


def min_rows_for(weight: mx.array) -> int:
    """The fewest rows from which a product with this (packed) weight takes one matrix."""
    return 2 if weight.nbytes >= BIG_WEIGHT_BYTES else MIN_ROWS


class WideQuantizedLinear(nn.QuantizedLinear):
    """mlx's QuantizedLinear, a batch's rows as one matrix (the same arrays)."""

    def __call__(self, x: mx.array) -> mx.array:
        return rows_as_matrix(x, super().__call__, min_rows_for(self["weight"]))


class WideQuantizedEmbedding(nn.QuantizedEmbedding):
    """mlx's QuantizedEmbedding whose use as a tied head takes its rows as one matrix."""

    def as_linear(self, x: mx.array) -> mx.array:
        return rows_as_matrix(x, super().as_linear, min_rows_for(self["weight"]))


def heads_leading(x: mx.array, product: Callable[[mx.array], mx.array], heads: int) -> mx.array:
    """`product(x)` for x of shape (B, h, L, K) (h = heads, or 1 broadcast over them) against
    per-head weights: computed as (heads, B * L, K), the heads leading. B = 1 is left as it is."""
    if x.ndim != 4 or x.shape[0] == 1:
        return product(x)
    b, h, length, k = x.shape
    if h == 1:  # one x for every head (a prompt's latents): all rows as one matrix, no copy per head
        y = product(x.reshape(1, b * length, k))
    else:
        y = product(x.transpose(1, 0, 2, 3).reshape(heads, b * length, k))
    return y.reshape(heads, b, length, y.shape[-1]).transpose(1, 0, 2, 3)


class WideQuantizedMultiLinear(QuantizedMultiLinear):
    """mlx-lm's QuantizedMultiLinear (MLA's per-head products), the heads leading."""

    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        return heads_leading(x, lambda v: QuantizedMultiLinear.__call__(self, v, transpose), self["weight"].shape[0])


_WIDE = {nn.QuantizedLinear: WideQuantizedLinear, nn.QuantizedEmbedding: WideQuantizedEmbedding,
         QuantizedMultiLinear: WideQuantizedMultiLinear}


def widen(model: nn.Module) -> int:
    """Switch every quantized linear layer, quantized embedding and MLA per-head product
    of `model` (in place: the same module objects, now of the subclasses above) to the
    calls above. Returns how many were switched."""
    n = 0
    for _, module in model.named_modules():
        wide = _WIDE.get(type(module))
        if wide is not None:
            module.__class__ = wide  # a subclass adding no state: only the calls change
            n += 1
    return n
