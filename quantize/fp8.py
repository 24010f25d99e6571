"""DeepSeek's FP8 e4m3 weights with 128x128 block scales, back to bfloat16."""

from __future__ import annotations

import mlx.core as mx

BLOCK = 128


def dequantize_fp8(weight: mx.array, scale_inv: mx.array, block: int = BLOCK) -> mx.array:
    """weight (uint8 holding e4m3, shape m x n) times its block's scale, in bfloat16.

    scale_inv has shape (ceil(m/block), ceil(n/block)); the last blocks may be partial.
    The product is taken in float32 and rounded once to bfloat16, as DeepSeek's own
    `fp8_cast_bf16.py` and mlx-lm's deepseek_v3 `sanitize` do.
    """
    m, n = weight.shape
    w = mx.from_fp8(weight, dtype=mx.bfloat16)
    pad_m, pad_n = (-m) % block, (-n) % block
    w = mx.pad(w, ((0, pad_m), (0, pad_n)))
    w = w.reshape((m + pad_m) // block, block, (n + pad_n) // block, block)
    w = (w * scale_inv[:, None, :, None]).reshape(m + pad_m, n + pad_n)
    return w[:m, :n].astype(mx.bfloat16)


def scale_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, int]:
    m, n = shape
    return (-(-m // block), -(-n // block))
