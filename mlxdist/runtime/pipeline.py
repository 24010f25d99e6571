"""What every rank does with each message: its layers, caches and samplers (StageRunner),
and the loop of ranks 1..N-1 (follower_loop). Rank 0's scheduler is coordinator.py.

Each message goes round the ring once: rank 0 embeds and runs its layers, each stage runs
its layers and passes the hidden state on, the last stage runs the head, samples, and sends
only a header with the token ids back to rank 0 (ring_link.py has the messages). Every message
rank 0 sends comes back exactly once (tokens or an ACK), in order, except JOIN, LEAVE,
MERGE and MOVE, which the last stage applies silently.

A sequence's prompt runs alone, in its own caches (a *slot*), in chunks, and its first
token is sampled there too; then it joins a *group* and decodes as one row of that group's
batched forward (batch.py): one message per group step carries all its rows. New prompts
that arrive together may instead join a fresh group first and run as one padded forward.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from mlxdist.runtime.batch import Batch, batchable, sample_rows
from mlxdist.runtime.lockstep import follow_run
from mlxdist.runtime.prefix_cache import copy_caches, trim_caches
from mlxdist.runtime.profile import StepProfile
from mlxdist.runtime.sampling import SlotSampler
from mlxdist.runtime.stage import LoadedStage
from mlxdist.runtime.ring_link import (
    DTYPES, FLAG_GROUP, FLAG_RETAIN, FLAG_REUSE, FLAG_SAMPLE, GROUP_OPS, OP_ACK, OP_FORWARD, OP_FREE, OP_JOIN,
    OP_LEAVE, OP_MERGE, OP_PARK, OP_RUN, OP_SETUP, OP_STOP, OP_TOKEN, OP_TRIM, RingLink, header, token_header,
)


class StageRunner:
    """One rank's layers plus the caches (and, on the last stage, the samplers) of the
    slots and groups it has been told about. Caches live only here; nothing else holds
    them. `caches` are the slots' own: prompts being prefilled and retained prefixes;
    `groups` the decoding rows, batched."""

    def __init__(self, stage: LoadedStage, combines: bool = False):
        self.stage = stage
        # the layers combine across ranks (an expert-parallel stage of a mixed plan): the
        # last stage evaluates a prompt chunk's hidden state too, so that a combine in the
        # last layer, which feeds no cache, runs on every member
        self.combines = combines
        self.caches: dict[int, list[Any]] = {}
        self.samplers: dict[int, SlotSampler] = {}
        self.groups: dict[int, Batch] = {}
        self.batchable = batchable(stage.make_cache())

    def setup(self, slot: int, words: np.ndarray, keep: int | None = None, source: int = 0) -> None:
        """A new sequence in `slot`: fresh caches, or (`keep`) a copy of the `source`
        slot's caches cut to their first `keep` positions (a prompt prefix rank 0 found
        there: a retained sequence's, or a live one's, in its own caches or a group's row;
        the source goes on unchanged)."""
        if keep is None:
            self.caches[slot] = self.stage.make_cache()
        elif source in self.caches:
            self.caches[slot] = copy_caches(self.caches[source], keep)
        else:
            batch = next(b for b in self.groups.values() if source in b.slots)
            self.caches[slot] = copy_caches(batch.row(source), keep)
        if self.stage.spec.is_last:
            self.samplers[slot] = SlotSampler.decode(words)

    def free(self, slot: int) -> None:
        self.caches.pop(slot, None)
        self.samplers.pop(slot, None)

    def cache_len(self, slot: int) -> int:
        return int(self.caches[slot][0].offset)

    def trim(self, slot: int, length: int) -> None:
        trim_caches(self.caches[slot], length)

    def join(self, group: int, slot: int, prompt: int = 0) -> None:
        """`slot` becomes the last row of `group`, with `prompt` tokens of its prompt still
        to run (0: prefilled, its first token sampled)."""
        self.groups.setdefault(group, Batch()).join(slot, self.caches.pop(slot), prompt)

    def merge(self, group: int, other: int) -> None:
        """Group `other`'s rows join the end of `group`."""
        self.groups.setdefault(group, Batch()).absorb(self.groups.pop(other))

    def apply(self, h: np.ndarray) -> None:
        """A JOIN, LEAVE, MERGE or MOVE header (GROUP_OPS; ring_link.py has their words), applied
        to this rank's groups."""
        op, group, n, flags, slot, to = (int(h[i]) for i in (0, 1, 2, 3, 5, 6))
        if op == OP_JOIN:
            self.join(group, slot, n)
        elif op == OP_LEAVE:
            self.leave(group, slot, bool(flags & FLAG_RETAIN))
        elif op == OP_MERGE:
            self.merge(group, slot)
        else:
            self.move(group, slot, to)

    def move(self, group: int, slot: int, to: int) -> None:
        """`slot`'s row leaves `group` for the end of group `to`, caches and sampler kept."""
        batch = self.groups[group]
        caches = batch.leave(slot, True)
        if not batch:
            del self.groups[group]
        self.groups.setdefault(to, Batch()).join(slot, caches)

    def leave(self, group: int, slot: int, retain: bool) -> None:
        """`slot`'s row leaves `group`; with `retain` its caches stay in the slot."""
        batch = self.groups[group]
        kept = batch.leave(slot, retain)
        if kept is not None:
            self.caches[slot] = kept
        if not batch:
            del self.groups[group]
        self.samplers.pop(slot, None)

    def step(self, group: int, x: mx.array, sample: bool) -> Any:
        """One batched forward of every row of `group`: x is [B, n] token ids on the first
        stage, [B, n, D] hidden states on the others; n = 1 a decode step, n > 1 the rows'
        pending prompt tokens, right-padded. The last stage, sampling, returns
        sample_rows's (tokens, logprobs, tops); after prompts, the caches' states;
        otherwise the hidden states."""
        batch = self.groups[group]
        if x.shape[1] > 1:
            h = batch.forward_prompts(lambda caches: self.stage.forward(x, caches), x.shape[1])
            # the last stage: the caches are what matters, and the hidden state too where
            # a collective inside the last layer must run everywhere (expert parallel)
            return [h, *(c.state for c in batch.caches)] if self.stage.spec.is_last else h
        if self.stage.spec.is_last and sample:
            logits = self.stage.forward(x, batch.caches, logits=True)[:, -1, :]
            return sample_rows([self.samplers[s] for s in batch.slots], logits)
        return self.stage.forward(x, batch.caches)

    def kv_bytes(self) -> int:
        try:
            return int(sum(c.nbytes for caches in self.caches.values() for c in caches)
                       + sum(b.nbytes() for b in self.groups.values()))
        except Exception:  # a cache type without nbytes: unknown
            return 0

    def forward(self, slot: int, x: mx.array, sample: bool) -> Any:
        cache = self.caches[slot]
        if self.stage.spec.is_last and sample:
            logits = self.stage.forward(x, cache, logits=True)[:, -1, :]
            return self.samplers[slot].sample(logits)
        h = self.stage.forward(x, cache)
        if self.stage.spec.is_last:  # prompt chunk: only the cache matters (as in mlx-lm)
            return [h, *(c.state for c in cache)] if self.combines else [c.state for c in cache]
        return h


def follower_loop(runner: StageRunner, link: RingLink, hidden_size: int,
                  wait_for_wake: Callable[[int], None] = lambda kicks: None, relay: bool = False) -> None:
    """Ranks 1..N-1: receive, compute, pass on, until STOP. On PARK (rank 0 has nothing to
    do) the rank waits for the engine's wake-up instead of sitting in a ring recv, which
    the ring backend serves by polling a core.

    `relay`: a member of an expert-parallel stage that is not its last (mixed.py). It
    passes every message on as it came, a FORWARD's input included (to the next member,
    before any of that forward's combine messages), runs its layers for their share of
    each combine, and sends nothing of its own; the stage's last member sends on."""
    last = runner.stage.spec.is_last
    prof = StepProfile(link.rank)
    while True:
        t0 = time.perf_counter()
        h = link.recv_header()
        t1 = time.perf_counter()
        op, slot, n, flags, dt, tag = (int(v) for v in (h[0], h[1], h[2], h[3], h[4], h[7]))
        if relay and op == OP_FORWARD:
            grouped = bool(flags & FLAG_GROUP)
            x = link.recv_payload((len(runner.groups[slot]) if grouped else 1, n, hidden_size), DTYPES[dt])
            mx.async_eval(link.send(mx.array(h), x))
            out = runner.step(slot, x, False) if grouped else runner.forward(slot, x, False)
            mx.async_eval(out)
            prof.row(op, n, t0, t1, out)
        elif op == OP_SETUP:
            words = link.recv_payload((n,), mx.int32)
            mx.eval(words)
            runner.setup(slot, np.array(words), int(h[5]) if flags & FLAG_REUSE else None, int(h[6]))
            sends = link.send(header(OP_ACK, slot, tag=tag)) if last else link.send(mx.array(h), words)
            mx.async_eval(sends)
        elif op == OP_FORWARD and flags & FLAG_GROUP:
            x = link.recv_payload((len(runner.groups[slot]), n, hidden_size), DTYPES[dt])
            out = runner.step(slot, x, bool(flags & FLAG_SAMPLE))
            if not last:
                mx.async_eval(link.send(mx.array(h), out))
            elif not flags & FLAG_SAMPLE:  # prompts: only the caches matter
                mx.async_eval(link.send(header(OP_ACK, slot, tag=tag)), out)
            else:
                tokens, logprobs, top = out  # one message: header and payload (ring_link.py)
                parts = [tokens, logprobs.astype(mx.float32).view(mx.int32)] + ([top] if top is not None else [])
                n_words = sum(p.size for p in parts)
                mx.async_eval(link.send(mx.concatenate([header(OP_TOKEN, slot, n_words, FLAG_GROUP, tag=tag), *parts])))
            prof.row(op, n, t0, t1, list(out) if isinstance(out, tuple) else out)
        elif op in GROUP_OPS:
            runner.apply(h)
            if not last:
                mx.async_eval(link.send(mx.array(h)))
        elif op == OP_FORWARD:
            x = link.recv_payload((1, n, hidden_size), DTYPES[dt])
            out = runner.forward(slot, x, bool(flags & FLAG_SAMPLE))
            if not last:
                mx.async_eval(link.send(mx.array(h), out))
            elif flags & FLAG_SAMPLE:
                token, logprob, top = out
                n_top = 0 if top is None else top.size // 2
                mx.async_eval(link.send(token_header(slot, token, logprob, tag, n_top), top))
            else:
                mx.async_eval(link.send(header(OP_ACK, slot, tag=tag)), out)
            prof.row(op, n, t0, t1, [o for o in out if o is not None] if isinstance(out, tuple) else out)
        elif op == OP_RUN:
            words = link.recv_payload((n,), mx.int32)
            mx.eval(words)
            mx.eval(link.send(header(OP_ACK, slot, tag=tag)) if last else link.send(mx.array(h), words))
            follow_run(runner, link, np.array(words), dt, hidden_size)
        elif op == OP_TRIM:
            words = link.recv_payload((n,), mx.int32)
            mx.eval(words)
            for group, length in np.array(words).reshape(-1, 2).tolist():
                runner.groups[group].trim(length)
            mx.async_eval(link.send(header(OP_ACK, slot, tag=tag)) if last else link.send(mx.array(h), words))
        elif op == OP_PARK:
            mx.eval(link.send(header(OP_ACK, slot, tag=tag)) if last else link.send(mx.array(h)))
            wait_for_wake(tag)
        elif op in (OP_FREE, OP_STOP):
            runner.free(slot)
            mx.eval(link.send(header(OP_ACK, slot, tag=tag)) if last else link.send(mx.array(h)))
            if op == OP_STOP:
                return
        else:
            raise RuntimeError(f"rank {link.rank}: unknown message op {op}")


