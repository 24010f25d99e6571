"""Cutting rows out of batch caches (batch.filter_rows, batch.extract_row: one read of the
paddings for all layers) against mlx-lm's own BatchKVCache.filter and .extract, and a
group whose rows leave one by one within a step cut once."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlxdist.runtime.batch import Batch, extract_row, filter_rows


def _row_cache(n: int, seed: int) -> KVCache:
    c = KVCache()
    k = mx.random.normal((1, 2, n, 4), key=mx.random.key(seed))
    c.update_and_fetch(k, -k)
    return c


def _batch(lengths: list[int], layers: int = 3) -> list[BatchKVCache]:
    return [BatchKVCache.merge([_row_cache(n, 10 * layer + i) for i, n in enumerate(lengths)])
            for layer in range(layers)]


def _held(c) -> tuple[mx.array, mx.array]:
    """The keys and values a cache holds (a KVCache's buffer runs past its offset)."""
    if isinstance(c, BatchKVCache):
        return c.keys, c.values
    return c.keys[..., :c.offset, :], c.values[..., :c.offset, :]


def _same(a, b) -> None:
    assert type(a) is type(b)
    (ka, va), (kb, vb) = _held(a), _held(b)
    assert ka.shape == kb.shape and np.array_equal(np.array(ka), np.array(kb))
    assert np.array_equal(np.array(va), np.array(vb))
    if isinstance(a, BatchKVCache):
        assert a._idx == b._idx
        assert np.array(a.offset).tolist() == np.array(b.offset).tolist()
        assert np.array(a.left_padding).tolist() == np.array(b.left_padding).tolist()
    else:
        assert a.offset == b.offset


def test_filter_rows_equals_mlx_lm_filter():
    for lengths, keep in (([5, 2, 7, 3], [1, 3]), ([5, 2, 7, 3], [0, 2]), ([4, 4, 4], [2]), ([6, 1], [0, 1])):
        ours, theirs = _batch(lengths), _batch(lengths)
        filter_rows(ours, keep)
        for c in theirs:
            c.filter(keep)
        for a, b in zip(ours, theirs):
            _same(a, b)


def test_extract_row_equals_mlx_lm_extract():
    caches = _batch([5, 2, 7])
    for i in range(3):
        for a, b in zip(extract_row(caches, i), [c.extract(i) for c in copy.deepcopy(caches)]):
            _same(a, b)


def test_rows_leaving_in_one_step_are_cut_once(monkeypatch):
    import mlxdist.runtime.batch as batch

    cuts = []
    real = batch.filter_rows
    monkeypatch.setattr(batch, "filter_rows", lambda caches, keep: (cuts.append(list(keep)), real(caches, keep)))
    b = Batch()
    for slot, n in zip((7, 8, 9, 10), (5, 2, 7, 3)):
        b.join(slot, [_row_cache(n, slot)])
    kept = b.leave(8, keep=True)
    b.leave(10, keep=False)
    assert b.slots == [7, 9] and not cuts  # nothing cut yet
    _same(kept[0], _row_cache(2, 8))  # the kept row is its own cache, as it was
    caches = b.caches
    assert cuts == [[0, 2]] and caches[0].keys.shape[0] == 2
    assert np.array(caches[0].left_padding).tolist() == [2, 0]  # rows 7 (5) and 9 (7) of 7 positions
    b.leave(9, keep=False)
    only = b.caches  # one row left: its own single-sequence cache again
    assert not b.batched and type(only[0]) is KVCache
    _same(only[0], _row_cache(5, 7))
