"""Continuous batching on one stage: the rows of a group share one forward pass.

A *group* is a set of decoding sequences ("rows") that every stage runs as one batched
forward per step: one read of the weights for all of them. Each stage keeps, per group,
the rows' slots in row order and one set of caches. Rows join after their prompt is
prefilled (each prompt runs alone, in chunks, in its own cache, exactly as mlx-lm's
generate_step does, and its first token is sampled there) and leave when they finish or
are cancelled; every stage applies the same joins and leaves in the same order (they
travel the ring as messages), so the row order agrees everywhere.

The caches are mlx-lm's batch caches (`BatchKVCache` and friends, the ones its
BatchGenerator uses): a joining row's cache is merged in with `merge`/`extend`, a leaving
row is cut out with `filter` (and, when its prefix is kept for a later prompt, copied out
with `extract`). A group of one row keeps the row's own cache, unbatched, so a single
stream runs exactly the single-sequence code.

Several new prompts that each fit one chunk may also join a fresh group *before* their
prompt runs (each row with its number of prompt tokens still to run): one right-padded
forward then runs them all, as mlx-lm's prompt batches do, and the group's first step
samples their first tokens; the coordinator later merges the group into another.

Sampling stays per row: each row keeps its own `SlotSampler` (its key, temperature,
filters, penalty, logprobs); rows that are plainly greedy are sampled together.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
import numpy as np

from mlxdist.runtime.sampling import SlotSampler, draw, filtered, rows_noise


def batchable(caches: list[Any]) -> bool:
    """Whether a model's caches can hold several rows (mlx-lm gives `merge` to those that
    have a batch form; a quantized KV cache, for one, has none)."""
    return all(hasattr(c, "merge") and hasattr(type(c), "merge") for c in caches)


class Batch:
    """One group's rows on one stage: their slots in row order and their caches.

    A row that leaves is cut out of the caches lazily: the rows that left during a step are
    cut together, once, before the caches are next used (one `filter` per cache for all of
    them instead of one per row; on a GPU each is a copy of the caches and a wait for the
    device)."""

    def __init__(self) -> None:
        self.slots: list[int] = []  # the rows, in order
        self._rows: list[int] = []  # the caches' rows: `slots` and rows that left since the last cut
        self._caches: list[Any] = []
        self.batched = False  # caches are batch caches (two rows or more joined)
        self.pending: dict[int, int] = {}  # slot -> prompt tokens it joined with, still to run

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def caches(self) -> list[Any]:
        self._compact()
        return self._caches

    def _compact(self) -> None:
        """Cut the rows that left out of the caches."""
        if len(self._rows) == len(self.slots):
            return
        if not self.slots:
            self._rows, self._caches, self.batched = [], [], False
            return
        live = set(self.slots)
        keep = [i for i, s in enumerate(self._rows) if s in live]
        filter_rows(self._caches, keep)
        self._rows = list(self.slots)
        if len(keep) == 1:  # back to one row: its own cache again
            self._caches = extract_row(self._caches, 0)
            self.batched = False

    def join(self, slot: int, caches: list[Any], prompt: int = 0) -> None:
        """Add a row at the end; `caches` are its own (single-sequence) caches; `prompt`
        tokens of its prompt are still to run (with the other joiners', in one forward)."""
        one = Batch()
        one.slots, one._rows, one._caches = [slot], [slot], caches
        if prompt:
            one.pending[slot] = prompt
        self.absorb(one)

    def absorb(self, other: "Batch") -> None:
        """Append `other`'s rows (a group merging into this one)."""
        self._compact()
        other._compact()
        if not self.slots:
            self.slots, self._rows = list(other.slots), list(other.slots)
            self._caches, self.batched = other._caches, other.batched
        else:
            if not self.batched:
                self._caches = [type(c).merge([c]) for c in self._caches]
                self.batched = True
            theirs = other._caches if other.batched else [type(c).merge([c]) for c in other._caches]
            for mine, t in zip(self._caches, theirs):
                mine.extend(t)
            self.slots += other.slots
            self._rows = list(self.slots)
        self.pending.update(other.pending)

    def forward_prompts(self, forward: Callable[[list[Any]], mx.array], n: int) -> mx.array:
        """Run the rows' pending prompt tokens, right-padded to `n`, as one forward (as
        mlx-lm's prompt batches do: the caches learn the padding, and move it to the left
        after); `forward(caches)` runs the layers."""
        caches = self.caches
        lengths = [self.pending.pop(s, 0) for s in self.slots]
        if not self.batched:
            return forward(caches)
        for c in caches:
            c.prepare(lengths=lengths, right_padding=[n - k for k in lengths])
        out = forward(caches)
        for c in caches:
            c.finalize()
        return out

    def row(self, slot: int) -> list[Any]:
        """`slot`'s row as single-sequence caches (views: copy before writing to them)."""
        caches = self.caches
        if not self.batched:
            return caches
        return extract_row(caches, self.slots.index(slot))

    def leave(self, slot: int, keep: bool) -> list[Any] | None:
        """Remove `slot`'s row; with `keep`, return its caches as single-sequence caches
        (for prefix reuse), else None. The caches lose the row at the next cut."""
        self.pending.pop(slot, None)
        out = None
        if not self.batched:
            out = self._caches if keep else None
            self._rows, self._caches = [], []
        elif keep:
            out = extract_row(self._caches, self._rows.index(slot))
        self.slots.remove(slot)
        return out

    def size(self) -> int:
        """Positions held (the same for every row's view: a batch cache's index)."""
        caches = self.caches
        return int(caches[0].size()) if caches else 0

    def trim(self, length: int) -> None:
        """Cut every row back to `length` positions (a lock-step run's cut-off passes)."""
        n = self.size() - length
        if n > 0:
            for c in self.caches:
                c.trim(n)

    def nbytes(self) -> int:
        """Bytes the caches hold (rows that left included, until they are cut)."""
        return int(sum(c.nbytes for c in self._caches))

    def trimmable(self) -> bool:
        """Whether the caches can be cut back (their types say; no cut of left rows)."""
        return all(c.is_trimmable() for c in self._caches)


def _left_padding(caches: list[Any]) -> list[np.ndarray | None]:
    """Each BatchKVCache's left padding, read from the device in one go (mlx-lm's own
    `filter` and `extract` read it per cache: one wait for the device per layer)."""
    from mlx_lm.models.cache import BatchKVCache

    mine = [i for i, c in enumerate(caches) if type(c) is BatchKVCache]
    out: list[np.ndarray | None] = [None] * len(caches)
    if mine:
        pads = np.array(mx.stack([caches[i].left_padding for i in mine]))
        for j, i in enumerate(mine):
            out[i] = pads[j]
    return out


def filter_rows(caches: list[Any], keep: list[int]) -> None:
    """Keep rows `keep` of batch caches, in place: mlx-lm's `filter`, done here for its
    BatchKVCache with one read of the paddings for all layers; other caches filter
    themselves."""
    pads = _left_padding(caches)
    idx = mx.array(keep)
    for c, pad in zip(caches, pads):
        if pad is None:
            c.filter(keep)
            continue
        if c.keys is not None:
            c.keys, c.values = c.keys[idx], c.values[idx]
        c.offset, c.left_padding = c.offset[idx], c.left_padding[idx]
        shift = int(pad[keep].min())  # the padding every kept row has: cut it off
        if shift > 0:
            if c.keys is not None:
                c.keys, c.values = c.keys[..., shift:, :], c.values[..., shift:, :]
            c._idx -= shift
            c.left_padding = c.left_padding - shift


def extract_row(caches: list[Any], i: int) -> list[Any]:
    """Row `i` of batch caches as single-sequence caches: mlx-lm's `extract`, done here for
    its BatchKVCache with one read of the paddings for all layers."""
    from mlx_lm.models.cache import KVCache

    out = []
    for c, pad in zip(caches, _left_padding(caches)):
        if pad is None:
            out.append(c.extract(i))
            continue
        one = KVCache()
        if c.keys is None:
            out.append(one)
            continue
        p = int(pad[i])
        one.keys = mx.contiguous(c.keys[i:i + 1, :, p:c._idx])
        one.values = mx.contiguous(c.values[i:i + 1, :, p:c._idx])
        one.offset = one.keys.shape[2]
        out.append(one)
    return out


def _plain_greedy(s: SlotSampler) -> bool:
    return (s.temperature == 0 and s.top_k_logprobs == 0
            and (s.repetition_penalty == 1.0 or s.repetition_context <= 0))


def sample_rows(samplers: list[SlotSampler], logits: mx.array) -> tuple[mx.array, mx.array, mx.array | None]:
    """logits [B, V] -> (tokens [B] int32, their logprobs [B] float32, the asked-for top
    logprobs of every row that wants them, concatenated in row order as int32, or None).
    Lazy. Plainly greedy batches are sampled in one go, and so are rows sampled alike, each
    with noise from its own key (a seeded row draws the same alone and in any batch)."""
    if all(_plain_greedy(s) for s in samplers):
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = mx.argmax(logprobs, axis=-1).astype(mx.int32)
        chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0].astype(mx.float32)
        return tokens, chosen, None
    # rows sampled alike (the same filters and temperature, each its own noise) in one go;
    # the rest (repetition penalty, top logprobs) each by its own sampler
    alike: dict[tuple, list[int]] = {}
    for i, s in enumerate(samplers):
        if s.simple:
            alike.setdefault(s.filters(), []).append(i)
    toks: list[mx.array | None] = [None] * len(samplers)
    lps: list[mx.array | None] = [None] * len(samplers)
    tops = []
    for rows in alike.values():
        if len(rows) < 2:
            continue
        s = samplers[rows[0]]
        part = logits if len(rows) == len(samplers) else logits[mx.array(rows)]
        logprobs = part - mx.logsumexp(part, axis=-1, keepdims=True)
        if s.temperature == 0:
            tokens = mx.argmax(logprobs, axis=-1)
        else:
            try:
                x = filtered(logprobs, s)
            except Exception:  # noqa: BLE001 - each row alone then, where a failure is its own
                continue
            tokens = draw(x, rows_noise([samplers[i] for i in rows], logits.shape[-1]), s.temperature)
        tokens = tokens.astype(mx.int32)
        chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0].astype(mx.float32)
        if len(rows) == len(samplers):  # every row sampled alike: no per-row pieces
            return tokens, chosen, None
        for j, i in enumerate(rows):
            toks[i], lps[i] = tokens[j:j + 1], chosen[j:j + 1]
    for i, s in enumerate(samplers):
        if toks[i] is None:
            toks[i], lps[i], top = s.sample(logits[i:i + 1])
            if top is not None:
                tops.append(top)
    return (mx.concatenate(toks), mx.concatenate(lps),
            mx.concatenate(tops) if tops else None)
