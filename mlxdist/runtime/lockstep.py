"""Lock-step decode runs: hidden states pass as collectives, and no follower reads a header.

Why: on MLX's CUDA build the ring backend's send/recv run on a CPU stream, and every hop of
the message protocol (pipeline.py) crosses CPU->GPU->CPU through slow events; a follower
must also read each header on the host before it can queue its layers. Both cost more
than the hand-off itself (docs/performance.md). An `all_sum` over an NCCL group runs on the
GPU stream; if every rank also knows in advance what it computes at every step, nobody has
to look at the data before queueing the next step, and the GPU never waits for the host.

How: once every sequence in the pipeline is decoding (prompts done), rank 0 sends one RUN
message (the normal way) that binds up to N sequences to N "lanes". From then on all ranks
move in ticks. At tick t every rank joins one `all_sum` of an [N, W] float32 buffer in which
only its own row is non-zero: rank r's output (its hidden state; for the last rank the
sampled token and its logprob). Rank r at tick t works on lane (t - r) mod N, taking its
input from row r-1 of the previous tick's sum (rank 0: the token in row N-1), so a lane
moves one stage per tick and, with N lanes, every rank computes at every tick: pipelined
decoding. Lanes with several sequences take them in turn, one per pass. Which slot a rank
works on at a tick is a pure function of the RUN message (`RunPlan.work_at`).

Stopping: rank 0's row also carries a control word, the tick at which the run ends (-1:
not decided). Followers read it LAG ticks late, after queueing the next ticks (reading it
at once would put a host sync in every step), so rank 0 announces an end LAG ticks ahead
and both sides stop after the same tick. Passes still inside the pipeline at the end are
wasted; rank 0 then sends TRIM (the normal way) with each continuing slot's true cache
length, and every rank trims its caches. Their samples never happened (the last rank
samples only on complete passes), so sampling state stays exact.

The same code runs over any group with all_sum: NCCL on CUDA GPUs; the ring group itself
on CPU, which is how the tests check it against mlx-lm.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from mlxdist.runtime.profile import StepProfile
from mlxdist.runtime.wire import DTYPES, OP_ACK, OP_RUN, OP_TRIM, dtype_code, header

if TYPE_CHECKING:
    from mlxdist.runtime.pipeline import Coordinator, Sequence, StageRunner
    from mlxdist.runtime.wire import RingLink

LAG = 2  # followers read a tick's control word this many ticks after queueing it
AHEAD = 2  # rank 0 queues this many ticks before reading the oldest one's result
EXTRA = 4  # row words after the hidden state: token, logprob, end tick, unused
OPEN = -1.0  # the control word while the end is not decided


@dataclass(frozen=True)
class RunPlan:
    """Which slots the lanes hold: lane l takes lanes[l][0], lanes[l][1], ... in turn."""

    lanes: tuple[tuple[int, ...], ...]

    @classmethod
    def deal(cls, slots: list[int], ranks: int) -> "RunPlan":
        """Sequences dealt round-robin over at most `ranks` lanes."""
        return cls(tuple(tuple(slots[lane::ranks]) for lane in range(min(ranks, len(slots)))))

    def encode(self) -> list[int]:
        words = [len(self.lanes)]
        for lane in self.lanes:
            words += [len(lane), *lane]
        return words

    @classmethod
    def decode(cls, words: np.ndarray) -> "RunPlan":
        lanes, i = [], 1
        for _ in range(int(words[0])):
            m = int(words[i])
            lanes.append(tuple(int(w) for w in words[i + 1:i + 1 + m]))
            i += 1 + m
        return cls(tuple(lanes))

    def work_at(self, rank: int, tick: int, ranks: int) -> int | None:
        """The slot rank `rank` computes at `tick`, or None (idle). Rank 0 starts lane l at
        tick l and again every `ranks` ticks; the work reaches rank r r ticks later."""
        u = tick - rank
        if u < 0 or u % ranks >= len(self.lanes):
            return None
        lane = self.lanes[u % ranks]
        return lane[(u // ranks) % len(lane)]


class TickExchange:
    """One all_sum per tick over `group`: each rank contributes its row of [N, W]."""

    def __init__(self, group: mx.distributed.Group, hidden_size: int):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.hidden = hidden_size
        self.width = hidden_size + EXTRA
        self._above = mx.zeros((self.rank, self.width), mx.float32)
        self._below = mx.zeros((self.size - 1 - self.rank, self.width), mx.float32)
        self._no_hidden = mx.zeros((hidden_size,), mx.float32)

    def exchange(self, row: mx.array) -> mx.array:
        full = mx.concatenate([self._above, row[None], self._below])
        return mx.distributed.all_sum(full, group=self.group)

    def hidden_row(self, h: mx.array | None, end: float = 0.0) -> mx.array:
        hid = self._no_hidden if h is None else h.reshape(-1).astype(mx.float32)
        return mx.concatenate([hid, mx.array([0.0, 0.0, end, 0.0], mx.float32)])

    def token_row(self, token: mx.array, logprob: mx.array) -> mx.array:
        return mx.concatenate([self._no_hidden, token.reshape(1).astype(mx.float32),
                               logprob.reshape(1).astype(mx.float32), mx.zeros((2,), mx.float32)])

    def hidden_from(self, summed: mx.array, rank: int, dtype: mx.Dtype) -> mx.array:
        return summed[rank, :self.hidden].astype(dtype).reshape(1, 1, self.hidden)

    def token_from(self, summed: mx.array) -> mx.array:
        return summed[self.size - 1, self.hidden:self.hidden + 1].astype(mx.int32).reshape(1, 1)

    def end_of(self, summed: mx.array) -> int:
        return int(summed[0, self.hidden + 2].item())


# -- followers (ranks 1..N-1) -------------------------------------------------------------
def follow_run(runner: "StageRunner", link: "RingLink", words: np.ndarray, dtype_id: int,
               hidden_size: int) -> int:
    """Run ticks until the end rank 0 announces; returns the number of ticks."""
    plan = RunPlan.decode(words)
    ex = TickExchange(link.collective, hidden_size)
    rank, size, last = ex.rank, ex.size, runner.stage.spec.is_last
    dtype = DTYPES[dtype_id]
    prev: mx.array | None = None
    unread: deque[mx.array] = deque()
    prof = StepProfile(rank)
    tick, end = 0, None
    while True:
        t0 = time.perf_counter()
        slot = plan.work_at(rank, tick, size)
        if slot is None:
            row = ex.hidden_row(None)
        elif last:
            token, logprob, _ = runner.forward(slot, ex.hidden_from(prev, rank - 1, dtype), True)
            row = ex.token_row(token, logprob)
        else:
            row = ex.hidden_row(runner.forward(slot, ex.hidden_from(prev, rank - 1, dtype), False))
        prev = ex.exchange(row)
        mx.async_eval(prev)
        unread.append(prev)
        t1 = time.perf_counter()
        if len(unread) > LAG:  # the oldest tick is done or nearly: its control word is cheap to read
            announced = ex.end_of(unread.popleft())
            if announced >= 0:
                end = announced
        prof.tick(int(slot is not None), t1 - t0, time.perf_counter() - t1, t0)
        if end is not None and tick >= end:
            if tick != end:
                raise RuntimeError(f"rank {rank}: run end {end} announced too late (tick {tick})")
            return tick + 1
        tick += 1


# -- rank 0 ----------------------------------------------------------------------------
def run_candidates(coord: "Coordinator") -> list["Sequence"]:
    """Sequences a run can take: all of them when every one is decoding (none setting up,
    prefilling or waiting to be freed, none asking for top logprobs), their caches
    trimmable. Otherwise [] and the message protocol goes on."""
    if coord.link is None or coord.link.collective is None or coord.stopping:
        return []
    coord._admit()  # whoever still waits has no slot: a run does not hold them up
    if coord.inflight:  # the ring must be quiet (admitting may have sent a FREE)
        return []
    seqs = sorted(coord.seqs.values(), key=lambda s: s.slot)
    if not seqs or any(coord._next_op(s) != "step" or s.logprobs for s in seqs):
        return []
    if not all(c.is_trimmable() for s in seqs for c in coord.runner.caches[s.slot]):
        return []
    return seqs


def lead_run(coord: "Coordinator", seqs: list["Sequence"]) -> None:
    """Rank 0's side of one run over `seqs`: announce, tick until something needs the
    message protocol (a sequence finished, a new request, a cancel or stop), then trim."""
    link, runner = coord.link, coord.runner
    plan = RunPlan.deal([s.slot for s in seqs], link.size)
    by_slot = {s.slot: s for s in seqs}
    feed: dict[int, mx.array] = {}
    for s in seqs:
        tok = s.prompt[s.pos] if s.pos < len(s.prompt) else s.last_token
        s.pos = len(s.prompt)
        feed[s.slot] = mx.array([[tok]], dtype=mx.int32)
    base = {s.slot: runner.cache_len(s.slot) for s in seqs}
    passes = dict.fromkeys(by_slot, 0)
    # tick 0's hidden state, built (lazily) first: the followers need its dtype
    first = plan.work_at(0, 0, link.size)
    hidden: mx.array | None = runner.forward(first, feed[first], False)

    # The ring must be quiet before the collectives start (on CPU they share its sockets).
    words = plan.encode()
    mx.async_eval(link.send(header(OP_RUN, 0, len(words), 0, dtype_code(hidden.dtype)),
                            mx.array(words, dtype=mx.int32)))
    if int(link.recv_header()[0]) != OP_ACK:
        raise RuntimeError("rank 0: the RUN message did not come back as an ACK")

    ex = TickExchange(link.collective, int(runner.stage.config["hidden_size"]))
    size = ex.size
    unread: deque[tuple[mx.array, int | None]] = deque()

    def take(summed: mx.array, slot: int | None) -> None:
        if slot is None:
            mx.eval(summed)  # keeps rank 0 at most AHEAD ticks ahead
            return
        token, logprob = np.array(summed[size - 1, ex.hidden:ex.hidden + 2]).tolist()
        passes[slot] += 1
        s = by_slot[slot]
        if not s.finished:
            coord._accept(s, int(token), float(logprob), None)

    tick, end = 0, None
    while True:
        if end is None and _should_end(coord, seqs):
            end = tick + LAG
        slot = plan.work_at(0, tick, size)
        if tick > 0:
            hidden = None if slot is None else runner.forward(slot, feed[slot], False)
        summed = ex.exchange(ex.hidden_row(hidden, OPEN if end is None else float(end)))
        mx.async_eval(summed)
        done = plan.work_at(size - 1, tick, size)  # the slot whose token this tick brings
        if done is not None:
            feed[done] = ex.token_from(summed)
        unread.append((summed, done))
        if tick == end:
            break
        tick += 1
        while len(unread) > AHEAD:
            take(*unread.popleft())
    while unread:
        take(*unread.popleft())
    coord.stats["runs"] = coord.stats.get("runs", 0) + 1
    coord.stats["ticks"] = coord.stats.get("ticks", 0) + tick + 1

    # Passes cut off by the end left entries in some ranks' caches: cut every continuing
    # slot back to what its emitted tokens account for (a finished one is freed, or kept
    # for its prefix, which a reuse cuts to the part its tokens account for).
    keep = [(s.slot, base[s.slot] + passes[s.slot]) for s in seqs if not s.finished]
    if keep:
        words = [w for pair in keep for w in pair]
        for slot, length in keep:
            runner.trim(slot, length)
        mx.async_eval(link.send(header(OP_TRIM, 0, len(words)), mx.array(words, dtype=mx.int32)))
        coord.expect_ack()


def _should_end(coord: "Coordinator", seqs: list["Sequence"]) -> bool:
    coord._drain_commands(block=False)
    if coord.stopping or any(s.finished for s in seqs):
        return True
    # a new request that can start needs its prefill (admitted after the run: admitting may
    # free slots, and no message may cross the ring while it runs)
    return bool(coord.waiting) and len(coord.seqs) < coord.max_slots
