"""The whole model as ONE expert-parallel stage over every rank of the group.

Every rank loads all layers (attention, dense MLPs and the shared experts replicated) but
keeps only its own slice of each MoE layer's routed experts (`expert_parallel.py`: the
other experts are dropped from the stacked tensors before anything is read into memory),
or, from an expert-parallel conversion, loads its node's part, which holds only them.
A forward pass is the same on every rank; inside it, each MoE block does one `all_sum` of
the ranks' partial outputs, so every rank ends each layer with the single-device output.

Rank 0 runs the ordinary `Coordinator` (as a single stage, `link=None`) over an
`EPRunner`: before each SETUP, FORWARD, JOIN, LEAVE, MERGE, FREE, PARK or STOP it *broadcasts* the
message to the followers as two `all_sum`s, a fixed 8-word int32 header and then its
payload (the sampling words or the token ids), to which the other ranks contribute zeros.
Decoding is batched as on one stage (batch.py): a group's step broadcasts its rows' tokens
and every rank runs one forward over all of them. The ring and
jaccl backends offer `all_sum` over the whole group, so this needs no neighbour links.
Only rank 0 runs the head and samples: the followers get each next token in the next
FORWARD's payload, so no rank needs to agree on a sample.

MLX requires every rank to issue the same collectives in the same order. Rank 0 builds its
steps lazily (the Coordinator chains decode steps without a host sync), so each payload
`all_sum` is made to depend on its header `all_sum`, and the blocks' `all_sum`s depend on
the payload: within a step the order is fixed by the graph, across steps by the stream.
Rank 0 evaluates the whole hidden state also on prompt chunks, because the last layer's
`all_sum` feeds no cache and would otherwise never run there while followers wait in it.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxdist.errors import plural
from mlxdist.placement.plan import Plan
from mlxdist.runtime.expert_parallel import expert_parallel, is_moe_block, routed_experts, split_experts
from mlxdist.runtime.coordinator import Coordinator
from mlxdist.runtime.pipeline import StageRunner
from mlxdist.runtime.profile import StepProfile
from mlxdist.runtime.stage import LoadedStage
from mlxdist.runtime.ring_link import (
    FLAG_GROUP, FLAG_RETAIN, FLAG_REUSE, FLAG_SAMPLE, GROUP_OPS, OP_FORWARD, OP_FREE, OP_JOIN, OP_LEAVE, OP_MERGE,
    OP_MOVE, OP_PARK, OP_SETUP, OP_STOP, header,
)


def num_routed_experts(model: nn.Module) -> int:
    """Routed experts per MoE layer (0: no MoE layer), counted by the router, so a part
    holding only some experts' rows still gives the model's number."""
    for layer in model.layers:
        block = getattr(layer, "mlp", None)
        if block is not None and is_moe_block(block):
            return routed_experts(block)
    return 0


def keep_own_experts(model: nn.Module, group: mx.distributed.Group,
                     owned: list[int] | None = None) -> list[int]:
    """Patch every MoE block of `model` for this rank of `group` (default share: an even
    contiguous split of the routed experts); returns the experts this rank holds. Call it
    before the parameters are evaluated, so the other experts are never held. A model
    loaded from a node's part already holds only `owned` (in that row order): kept as is."""
    n = num_routed_experts(model)
    if n == 0:
        raise ValueError("expert parallel needs a model with MoE blocks (deepseek_v3, qwen3_moe)")
    if group.size() > n:
        raise ValueError(f"{plural(group.size(), 'rank')} but only {plural(n, 'routed expert')} per layer")
    mine = list(owned) if owned is not None else split_experts(n, group.size())[group.rank()]
    expert_parallel(model, mine, group)
    return mine


def experts_from_plan(plan: Plan) -> list[list[int]]:
    """Each rank's expert ids from a plan whose single stage is expert-parallel over all
    layers; ranks in the stage's node order (the plan's ring order)."""
    if len(plan.stages) != 1 or not plan.stages[0].expert_parallel:
        raise ValueError("the plan is not one expert-parallel stage over the whole group")
    st = plan.stages[0]
    return [list(st.experts_of(node)) for node in st.nodes]


class Broadcast:
    """Rank 0 -> every rank, as `all_sum`s in which the other ranks contribute zeros."""

    HEADER_WORDS = 8

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank = group.rank()
        self.messages = 0

    def _sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group)

    # rank 0
    def send(self, head: mx.array, payload: mx.array | None = None) -> mx.array:
        """Lazy: returns the broadcast payload (or header), ordered after the header."""
        self.messages += 1
        h = self._sum(head)
        if payload is None:
            return h
        return self._sum(payload.astype(mx.int32) + 0 * h[0])

    # the followers
    def recv_header(self) -> np.ndarray:
        h = self._sum(mx.zeros((self.HEADER_WORDS,), dtype=mx.int32))
        mx.eval(h)
        return np.array(h)

    def recv_payload(self, n: int) -> mx.array:
        return self._sum(mx.zeros((n,), dtype=mx.int32))


class EPRunner(StageRunner):
    """Rank 0's runner: tells the followers each message, then does it locally."""

    def __init__(self, stage: LoadedStage, bcast: Broadcast):
        super().__init__(stage)
        self.bcast = bcast

    def setup(self, slot: int, words: np.ndarray, keep: int | None = None, source: int = 0) -> None:
        head = header(OP_SETUP, slot, len(words), 0 if keep is None else FLAG_REUSE, value=keep or 0, aux=source)
        mx.eval(self.bcast.send(head, mx.array(words, dtype=mx.int32)))
        super().setup(slot, words, keep, source)

    def free(self, slot: int) -> None:
        mx.eval(self.bcast.send(header(OP_FREE, slot)))
        super().free(slot)

    def control(self, op: int, tag: int = 0) -> None:
        mx.eval(self.bcast.send(header(op, 0, tag=tag)))

    def forward(self, slot: int, x: mx.array, sample: bool) -> Any:
        n = int(x.size)
        tokens = self.bcast.send(header(OP_FORWARD, slot, n, FLAG_SAMPLE if sample else 0),
                                 x.reshape(-1)).reshape(1, n)
        if sample:
            return super().forward(slot, tokens, True)
        # a prompt chunk: evaluate the hidden state too, so that every MoE all_sum runs
        return [self.stage.forward(tokens, self.caches[slot])]

    def join(self, group: int, slot: int, prompt: int = 0) -> None:
        mx.eval(self.bcast.send(header(OP_JOIN, group, prompt, value=slot)))
        super().join(group, slot, prompt)

    def merge(self, group: int, other: int) -> None:
        mx.eval(self.bcast.send(header(OP_MERGE, group, value=other)))
        super().merge(group, other)

    def move(self, group: int, slot: int, to: int) -> None:
        mx.eval(self.bcast.send(header(OP_MOVE, group, value=slot, aux=to)))
        super().move(group, slot, to)

    def leave(self, group: int, slot: int, retain: bool) -> None:
        mx.eval(self.bcast.send(header(OP_LEAVE, group, flags=FLAG_RETAIN if retain else 0, value=slot)))
        super().leave(group, slot, retain)

    def step(self, group: int, x: mx.array, sample: bool) -> Any:
        flags = FLAG_GROUP | (FLAG_SAMPLE if sample else 0)
        tokens = self.bcast.send(header(OP_FORWARD, group, int(x.size), flags), x.reshape(-1))
        return super().step(group, tokens.reshape(x.shape), sample)


class EPCoordinator(Coordinator):
    """The Coordinator over an EPRunner: as a single stage (no ring link), plus PARK when
    idle and STOP at the end, broadcast to the followers."""

    def _park(self) -> bool:
        self.parked = True
        self.runner.control(OP_PARK, self.kicks)
        return True

    def _shutdown_ring(self) -> None:
        self.runner.control(OP_STOP)


def ep_follower_loop(stage: LoadedStage, bcast: Broadcast,
                     wait_for_wake: Callable[[int], None] = lambda kicks: None) -> None:
    """Ranks 1..N-1: receive each broadcast message and run the same forward as rank 0
    (without the head: rank 0 samples and sends the tokens in the next FORWARD)."""
    runner = StageRunner(stage)  # its caches and groups; its samplers go unused
    prof = StepProfile(bcast.rank)
    while True:
        t0 = time.perf_counter()
        h = bcast.recv_header()
        t1 = time.perf_counter()
        op, slot, n, flags, tag = int(h[0]), int(h[1]), int(h[2]), int(h[3]), int(h[7])
        if op == OP_SETUP:
            words = bcast.recv_payload(n)
            mx.eval(words)
            runner.setup(slot, np.array(words), int(h[5]) if flags & FLAG_REUSE else None, int(h[6]))
        elif op == OP_FORWARD:
            tokens = bcast.recv_payload(n)
            if flags & FLAG_GROUP:  # a group's step, or its rows' prompts: [B, n / B]
                rows = len(runner.groups[slot])
                out = runner.step(slot, tokens.reshape(rows, n // rows), False)
            else:
                out = stage.forward(tokens.reshape(1, n), runner.caches[slot])
            mx.async_eval(out)
            prof.row(op, n, t0, t1, out)
        elif op in GROUP_OPS:
            runner.apply(h)
        elif op == OP_FREE:
            runner.free(slot)
        elif op == OP_PARK:
            wait_for_wake(tag)
        elif op == OP_STOP:
            return
        else:
            raise RuntimeError(f"rank {bcast.rank}: unknown broadcast op {op}")
