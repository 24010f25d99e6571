"""A batch's rows as one matrix in quantized products (runtime/wide_products.py): what MLX's
CUDA backend needs to read a weight once per step instead of once per row. The CPU runs
the same code when forced (MLXDIST_WIDE_PRODUCTS=1); the references are independent: a
numpy product over weights unpacked by MLX's documented affine format, and mlx-lm's own
unchanged model decoding each prompt alone."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from runtime_helpers import drain_concurrently, reference_tokens, tiny_models  # noqa: F401

from mlxdist.runtime.api import GenerationRequest
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine
from mlxdist.runtime.wide_products import (ENV, MIN_ROWS, PAD_ROWS, WideQuantizedEmbedding, WideQuantizedLinear,
                                           WideQuantizedMultiLinear, heads_leading, reads_weights_per_row,
                                           rows_as_matrix, widen)

GROUP, BITS = 32, 4


def unpack_affine(w: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """MLX's affine 4-bit layout: each uint32 holds 8 values, the first in the lowest bits;
    value = scale * q + bias per group of GROUP along a row."""
    q = (w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    q = q.reshape(*w.shape[:-1], -1).astype(np.float64)
    return q * np.repeat(scales, GROUP, axis=-1) + np.repeat(biases, GROUP, axis=-1)


def packed(rng, *shape: int) -> tuple[mx.array, mx.array, mx.array]:
    """Random packed 4-bit weights of `shape` (..., N, K) with their scales and biases."""
    *lead, n, k = shape
    return (mx.array(rng.integers(0, 2 ** 32, (*lead, n, k * BITS // 32), dtype=np.uint32)),
            mx.array(rng.uniform(0.001, 0.01, (*lead, n, k // GROUP)).astype(np.float32)),
            mx.array(rng.uniform(-0.004, 0, (*lead, n, k // GROUP)).astype(np.float32)))


@pytest.mark.parametrize("min_rows", [None, 2])
@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (3, 1), (4, 1), (7, 1), (8, 1), (9, 1), (16, 1), (2, 5),
                                   (1, 3), (1, 12)])
def test_rows_as_matrix_equals_the_product_row_by_row(shape, min_rows):
    """Every leading row's result equals numpy's product with the unpacked weight, however
    the rows are laid out, padded to PAD_ROWS or not."""
    n, k = 48, 128
    rng = np.random.default_rng(sum(shape))
    w, s, b = packed(rng, n, k)
    x = mx.array(rng.normal(size=(*shape, k)).astype(np.float32))
    product = lambda v: mx.quantized_matmul(v, w, s, b, transpose=True, group_size=GROUP, bits=BITS)  # noqa: E731
    seen = []
    got = rows_as_matrix(x, lambda v: seen.append(v.shape) or product(v), min_rows)
    ref = np.asarray(x, np.float64) @ unpack_affine(np.asarray(w), np.asarray(s), np.asarray(b)).T
    assert got.shape == (*shape, n)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)
    rows = shape[0] * shape[1]
    if rows >= (min_rows or MIN_ROWS) and shape[0] > 1:  # several sequences' rows reach the kernel as one matrix
        assert seen == [(1, max(rows, PAD_ROWS), k)]
    else:  # one sequence's call, or a few rows: as the caller made it
        assert seen == [(*shape, k)]


@pytest.mark.parametrize("batch,heads_in,length,transpose", [
    (1, 4, 1, True), (3, 4, 1, True), (5, 4, 2, True), (3, 1, 6, False), (2, 4, 3, False)])
def test_heads_leading_equals_each_heads_product(batch, heads_in, length, transpose):
    """MLA's per-head products with the heads leading: every (row, head) equals numpy's
    product with that head's unpacked weight, x broadcast over the heads or one per head."""
    heads, n, k = 4, 64, 128
    rng = np.random.default_rng(batch * 10 + length)
    w, s, b = packed(rng, heads, n, k)
    x = mx.array(rng.normal(size=(batch, heads_in, length, n if not transpose else k)).astype(np.float32))
    product = lambda v: mx.quantized_matmul(v, w, s, b, transpose=transpose, group_size=GROUP, bits=BITS)  # noqa: E731
    got = heads_leading(x, product, heads)
    full = unpack_affine(np.asarray(w), np.asarray(s), np.asarray(b))  # (heads, n, k)
    ref = np.asarray(x, np.float64) @ (full.transpose(0, 2, 1) if transpose else full)
    assert got.shape == ref.shape
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)


def test_widen_switches_the_products_it_serves_and_no_others(tiny_models, monkeypatch):
    """Forced on, a loaded 4-bit stage's linear layers, MLA's per-head products and a tied
    head's embedding become the wide classes (same arrays); MoE experts stay as they were."""
    from mlxdist.runtime.stage import StageSpec, load_stage

    monkeypatch.setenv(ENV, "1")
    assert reads_weights_per_row()
    monkeypatch.setenv(ENV, "0")
    assert not reads_weights_per_row()
    monkeypatch.delenv(ENV)
    assert not reads_weights_per_row()  # the CPU backend reads weights once for all rows already
    with monkeypatch.context() as m:  # a GPU: CUDA's says yes, Metal's (no CUDA, or no mx.cuda at all) no
        m.setattr(mx, "default_device", lambda: mx.gpu)
        m.setattr(mx, "cuda", type("FakeCuda", (), {"is_available": staticmethod(lambda: True)}))
        assert reads_weights_per_row()
        m.setattr(mx.cuda, "is_available", staticmethod(lambda: False))
        assert not reads_weights_per_row()
        m.delattr(mx, "cuda")
        assert not reads_weights_per_row()

    monkeypatch.setenv(ENV, "1")
    stage = load_stage(tiny_models["qwen3_moe_q4"], StageSpec(0, 4, 4))
    kinds = {type(m).__name__ for _, m in stage.model.named_modules()}
    assert "WideQuantizedLinear" in kinds and "QuantizedLinear" not in kinds
    assert "QuantizedSwitchLinear" in kinds  # experts: each row its own, nothing to share
    mla = load_stage(tiny_models["deepseek_v3_q4"], StageSpec(0, 4, 4))
    assert isinstance(mla.model.model.layers[0].self_attn.embed_q, WideQuantizedMultiLinear)
    tied = load_stage(tiny_models["qwen3_q4"], StageSpec(0, 4, 4))
    assert isinstance(tied.model.model.embed_tokens, WideQuantizedEmbedding)

    plain = nn.QuantizedLinear(64, 16, bias=True, group_size=GROUP, bits=BITS)
    x = mx.random.normal((5, 1, 64))
    before = plain(x)
    assert widen(plain) == 1 and isinstance(plain, WideQuantizedLinear)
    assert mx.array_equal(plain(x), before)  # the bias too


def test_a_big_weight_takes_one_matrix_from_two_rows(monkeypatch):
    """At 2-3 rows only a weight of BIG_WEIGHT_BYTES or more (a big model's head) takes the
    padded matrix; a smaller one keeps the caller's rows. Both as numpy computes them."""
    from mlxdist.runtime import wide_products

    rng = np.random.default_rng(5)
    w, s, b = packed(rng, 48, 128)
    layer = nn.QuantizedLinear(128, 48, bias=False, group_size=GROUP, bits=BITS)
    layer.update({"weight": w, "scales": s, "biases": b})
    widen(layer)
    seen = []
    monkeypatch.setattr(mx, "quantized_matmul", lambda v, *a, _f=mx.quantized_matmul, **k: seen.append(v.shape)
                        or _f(v, *a, **k))
    x = mx.array(rng.normal(size=(2, 1, 128)).astype(np.float32))
    ref = np.asarray(x, np.float64) @ unpack_affine(np.asarray(w), np.asarray(s), np.asarray(b)).T
    for big, want in ((w.nbytes + 1, (2, 1, 128)), (w.nbytes, (1, PAD_ROWS, 128))):
        monkeypatch.setattr(wide_products, "BIG_WEIGHT_BYTES", big)
        seen.clear()
        np.testing.assert_allclose(np.asarray(layer(x)), ref, rtol=1e-4, atol=1e-4)
        assert seen == [want]


@pytest.mark.parametrize("arch,ranks,split", [
    ("deepseek_v3_q4", 1, None),  # MLA, shared experts, routed experts, untied head
    ("deepseek_v3_q4", 2, [2, 2]),
    ("qwen3_q4", 1, None),  # a tied head
])
def test_wide_rows_match_each_prompt_alone(tiny_models, monkeypatch, arch, ranks, split):
    """Eight requests at once with wide products forced on (the workers inherit the
    setting): every row's greedy tokens equal mlx-lm's for its prompt alone."""
    prompts = [list(f"row {i}: {'abcdefghij' * (i % 3)} the end".encode()) for i in range(8)]
    lengths = [6, 14, 9, 20, 3, 11, 16, 8]
    path = tiny_models[arch]
    refs = [reference_tokens(path, p, n) for p, n in zip(prompts, lengths)]
    monkeypatch.setenv(ENV, "1")
    with open_engine(path, EngineConfig(max_concurrent=8), ranks=ranks, split=split) as eng:
        handles = [eng.submit(GenerationRequest(tuple(p), n)) for p, n in zip(prompts, lengths)]
        assert drain_concurrently(handles) == refs
        assert eng.stats().get("widest", 0) >= 2
