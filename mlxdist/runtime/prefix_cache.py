"""Prefix caching: which finished sequences' caches rank 0 keeps, and how a new sequence
starts from one of them (docs/runtime.md, "Prefix caching").

Rank 0 only keeps the record (`RetainedPrefixes`): slot -> the tokens its caches hold.
Every rank keeps the caches themselves, since a retained slot is just one nobody freed; a
SETUP with FLAG_REUSE tells each rank to start the new slot from `copy_caches`.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import mlx.core as mx


class RetainedPrefixes:
    """Retained slots and the tokens their caches hold, least recently used first."""

    def __init__(self) -> None:
        self.held: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.held)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.held))

    def add(self, slot: int, tokens: list[int]) -> None:
        self.held[slot] = tokens

    def discard(self, slot: int) -> None:
        self.held.pop(slot, None)

    def find(self, prompt: list[int]) -> tuple[int, int]:
        """The slot sharing the longest prefix with `prompt` and that length: at least one
        token and never the last (it must be fed to sample); (0, 0) when none does. A hit
        becomes the most recently used."""
        best, keep = 0, 0
        for slot, held in self.held.items():
            n = common_prefix(prompt, held, len(prompt) - 1)
            if n > keep:
                best, keep = slot, n
        if keep:
            self.held[best] = self.held.pop(best)
        return best, keep

    def victims(self, keep: int, pinned: set[int]) -> list[int]:
        """The least recently used slots to free so that `keep` remain, sparing `pinned`
        (sources of copies not yet made)."""
        excess = len(self.held) - keep
        return [slot for slot in self.held if slot not in pinned][:max(excess, 0)]


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def copy_caches(caches: list[Any], length: int) -> list[Any]:
    """Caches that start as `caches` cut to `length` positions and then go their own way.
    Each array gets a new object: mlx-lm caches write into their arrays in place, which
    would otherwise change the source too."""
    out = []
    for c in caches:
        c2 = copy.copy(c)
        for name, value in vars(c).items():
            if isinstance(value, mx.array):
                setattr(c2, name, mx.array(value))
            elif isinstance(value, (tuple, list)) and value and all(isinstance(v, mx.array) for v in value):
                setattr(c2, name, type(value)(mx.array(v) for v in value))
        out.append(c2)
    trim_caches(out, length)
    return out


def trim_caches(caches: list[Any], length: int) -> None:
    """Drop every position past `length` (a lock-step run's cut-off passes, or the part of
    a retained sequence a new prompt does not share)."""
    for c in caches:
        if c.offset > length:
            c.trim(c.offset - length)
