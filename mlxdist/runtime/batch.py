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

from mlxdist.runtime.sampling import SlotSampler, draw, filtered


def batchable(caches: list[Any]) -> bool:
    """Whether a model's caches can hold several rows (mlx-lm gives `merge` to those that
    have a batch form; a quantized KV cache, for one, has none)."""
    return all(hasattr(c, "merge") and hasattr(type(c), "merge") for c in caches)


class Batch:
    """One group's rows on one stage: their slots in row order and their caches."""

    def __init__(self) -> None:
        self.slots: list[int] = []
        self.caches: list[Any] = []
        self.batched = False  # caches are batch caches (two rows or more joined)
        self.pending: dict[int, int] = {}  # slot -> prompt tokens it joined with, still to run

    def __len__(self) -> int:
        return len(self.slots)

    def join(self, slot: int, caches: list[Any], prompt: int = 0) -> None:
        """Add a row at the end; `caches` are its own (single-sequence) caches; `prompt`
        tokens of its prompt are still to run (with the other joiners', in one forward)."""
        one = Batch()
        one.slots, one.caches = [slot], caches
        if prompt:
            one.pending[slot] = prompt
        self.absorb(one)

    def absorb(self, other: "Batch") -> None:
        """Append `other`'s rows (a group merging into this one)."""
        if not self.slots:
            self.slots, self.caches, self.batched = list(other.slots), other.caches, other.batched
        else:
            if not self.batched:
                self.caches = [type(c).merge([c]) for c in self.caches]
                self.batched = True
            theirs = other.caches if other.batched else [type(c).merge([c]) for c in other.caches]
            for mine, t in zip(self.caches, theirs):
                mine.extend(t)
            self.slots += other.slots
        self.pending.update(other.pending)

    def forward_prompts(self, forward: Callable[[list[Any]], mx.array], n: int) -> mx.array:
        """Run the rows' pending prompt tokens, right-padded to `n`, as one forward (as
        mlx-lm's prompt batches do: the caches learn the padding, and move it to the left
        after); `forward(caches)` runs the layers."""
        lengths = [self.pending.pop(s, 0) for s in self.slots]
        if not self.batched:
            return forward(self.caches)
        for c in self.caches:
            c.prepare(lengths=lengths, right_padding=[n - k for k in lengths])
        out = forward(self.caches)
        for c in self.caches:
            c.finalize()
        return out

    def row(self, slot: int) -> list[Any]:
        """`slot`'s row as single-sequence caches (views: copy before writing to them)."""
        if not self.batched:
            return self.caches
        i = self.slots.index(slot)
        return [c.extract(i) for c in self.caches]

    def leave(self, slot: int, keep: bool) -> list[Any] | None:
        """Remove `slot`'s row; with `keep`, return its caches as single-sequence caches
        (for prefix reuse), else None."""
        i = self.slots.index(slot)
        self.pending.pop(slot, None)
        out = None
        if not self.batched:
            out = self.caches if keep else None
            self.caches = []
        else:
            if keep:
                out = [c.extract(i) for c in self.caches]
            rest = [j for j in range(len(self.slots)) if j != i]
            for c in self.caches:
                c.filter(rest)
            if len(rest) == 1:  # back to one row: its own cache again
                self.caches = [c.extract(0) for c in self.caches]
                self.batched = False
        self.slots.pop(i)
        return out

    def size(self) -> int:
        """Positions held (the same for every row's view: a batch cache's index)."""
        return int(self.caches[0].size()) if self.caches else 0

    def trim(self, length: int) -> None:
        """Cut every row back to `length` positions (a lock-step run's cut-off passes)."""
        n = self.size() - length
        if n > 0:
            for c in self.caches:
                c.trim(n)

    def nbytes(self) -> int:
        return int(sum(c.nbytes for c in self.caches))


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
            tokens = draw(x, [samplers[i].noise(logits.shape[-1]) for i in rows], s.temperature)
        tokens = tokens.astype(mx.int32)
        chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0].astype(mx.float32)
        for j, i in enumerate(rows):
            toks[i], lps[i] = tokens[j:j + 1], chosen[j:j + 1]
    for i, s in enumerate(samplers):
        if toks[i] is None:
            toks[i], lps[i], top = s.sample(logits[i:i + 1])
            if top is not None:
                tops.append(top)
    return (mx.concatenate(toks), mx.concatenate(lps),
            mx.concatenate(tops) if tops else None)
