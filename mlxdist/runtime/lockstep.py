"""Lock-step decode runs: hidden states pass as collectives, and no follower reads a header.

Why: on MLX's CUDA build the ring backend's send/recv run on a CPU stream, and every hop of
the message protocol (pipeline.py) crosses CPU->GPU->CPU through slow events; a follower
must also read each header on the host before it can queue its layers. Both cost more
than the hand-off itself (docs/performance.md). An `all_sum` over an NCCL group runs on the
GPU stream; if every rank also knows in advance what it computes at every step, nobody has
to look at the data before queueing the next step, and the GPU never waits for the host.

How: once every sequence in the pipeline is decoding in a group (coordinator.py: prompts
done, rows batched), rank 0 sends one RUN message (the normal way) that binds the groups
(at most N) to N "lanes". From then on all ranks move in ticks. At tick t every rank joins
one `all_sum` of an [N, W] float32 buffer in which only its own row is non-zero: rank r's
output (its group's hidden states, B x D; for the last rank the B sampled tokens and their
logprobs). Rank r at tick t works on lane (t - r) mod N, taking its input from row r-1 of
the previous tick's sum (rank 0: the tokens in row N-1), so a lane moves one stage per tick
and, with N lanes, every rank computes at every tick: pipelined, batched decoding. Lanes
with several groups take them in turn, one per pass. Which group a rank works on at a tick
is a pure function of the RUN message (`RunPlan.work_at`); every rank knows each group's
rows from the messages before it (JOIN, LEAVE, MERGE, MOVE), so W (room for the widest
group) too.

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
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from mlxdist.runtime.profile import StepProfile
from mlxdist.runtime.ring_link import DTYPES, OP_ACK, OP_RUN, OP_TRIM, RingLink, dtype_code, header


class Runner(Protocol):
    """What a run needs of a stage (pipeline.StageRunner): its batch groups and one step."""
    stage: Any
    groups: dict[int, Any]

    def step(self, group: int, x: mx.array, sample: bool) -> Any: ...


class Leader(Protocol):
    """What rank 0's side of a run needs of the coordinator (coordinator.Coordinator):
    its sequences and groups, and the calls that admit, accept, read commands and await an ACK."""
    link: RingLink | None
    runner: Runner
    groups: dict[int, Any]
    seqs: dict[int, Any]
    waiting: Any
    stopping: bool
    max_slots: int
    stats: dict[str, Any]

    def admit(self) -> None: ...
    def accept(self, s: Any, token: int, logprob: float, top: list | None) -> int: ...
    def drain_commands(self, block: bool) -> None: ...
    def expect_ack(self) -> None: ...

LAG = 2  # followers read a tick's control word this many ticks after queueing it
AHEAD = 2  # rank 0 queues this many ticks before reading the oldest one's result
OPEN = -1.0  # the control word while the end is not decided


@dataclass(frozen=True)
class RunPlan:
    """Which groups the lanes hold: lane l takes lanes[l][0], lanes[l][1], ... in turn."""

    lanes: tuple[tuple[int, ...], ...]

    @classmethod
    def deal(cls, groups: list[int], ranks: int) -> "RunPlan":
        """Groups dealt round-robin over at most `ranks` lanes."""
        return cls(tuple(tuple(groups[lane::ranks]) for lane in range(min(ranks, len(groups)))))

    def groups(self) -> list[int]:
        return [g for lane in self.lanes for g in lane]

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
        """The group rank `rank` computes at `tick`, or None (idle). Rank 0 starts lane l at
        tick l and again every `ranks` ticks; the work reaches rank r r ticks later."""
        u = tick - rank
        if u < 0 or u % ranks >= len(self.lanes):
            return None
        lane = self.lanes[u % ranks]
        return lane[(u // ranks) % len(lane)]


class TickExchange:
    """One all_sum per tick over `group`: each rank contributes its row of [N, W], room for
    the widest group's rows: W = G x D hidden values, then G tokens, G logprobs, the
    control word and one unused word."""

    def __init__(self, group: mx.distributed.Group, hidden_size: int, widest: int):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.hidden, self.g = hidden_size, widest
        self.tok_at = widest * hidden_size  # where the tokens start in a row
        self.width = self.tok_at + 2 * widest + 2
        self._above = mx.zeros((self.rank, self.width), mx.float32)
        self._below = mx.zeros((self.size - 1 - self.rank, self.width), mx.float32)

    def exchange(self, row: mx.array) -> mx.array:
        full = mx.concatenate([self._above, row[None], self._below])
        return mx.distributed.all_sum(full, group=self.group)

    def hidden_row(self, h: mx.array | None, end: float = 0.0) -> mx.array:
        hid = mx.zeros((0,), mx.float32) if h is None else h.reshape(-1).astype(mx.float32)
        tail = mx.zeros((self.width - 2 - hid.size,), mx.float32)
        return mx.concatenate([hid, tail, mx.array([end, 0.0], mx.float32)])

    def token_row(self, tokens: mx.array, logprobs: mx.array) -> mx.array:
        b = tokens.size
        pad = mx.zeros((self.g - b,), mx.float32)
        return mx.concatenate([mx.zeros((self.tok_at,), mx.float32), tokens.reshape(-1).astype(mx.float32), pad,
                               logprobs.reshape(-1).astype(mx.float32), pad, mx.zeros((2,), mx.float32)])

    def hidden_from(self, summed: mx.array, rank: int, dtype: mx.Dtype, rows: int) -> mx.array:
        return summed[rank, :rows * self.hidden].astype(dtype).reshape(rows, 1, self.hidden)

    def tokens_from(self, summed: mx.array, rows: int) -> mx.array:
        return summed[self.size - 1, self.tok_at:self.tok_at + rows].astype(mx.int32).reshape(rows, 1)

    def end_of(self, summed: mx.array) -> int:
        return int(summed[0, self.width - 2].item())


def _widest(runner: Runner, plan: RunPlan) -> int:
    return max(len(runner.groups[g]) for g in plan.groups())


# -- followers (ranks 1..N-1) -------------------------------------------------------------
def follow_run(runner: Runner, link: RingLink, words: np.ndarray, dtype_id: int,
               hidden_size: int) -> int:
    """Run ticks until the end rank 0 announces; returns the number of ticks."""
    plan = RunPlan.decode(words)
    ex = TickExchange(link.collective, hidden_size, _widest(runner, plan))
    rank, size, last = ex.rank, ex.size, runner.stage.spec.is_last
    dtype = DTYPES[dtype_id]
    prev: mx.array | None = None
    unread: deque[mx.array] = deque()
    prof = StepProfile(rank)
    tick, end = 0, None
    while True:
        t0 = time.perf_counter()
        group = plan.work_at(rank, tick, size)
        if group is None:
            row = ex.hidden_row(None)
        else:
            x = ex.hidden_from(prev, rank - 1, dtype, len(runner.groups[group]))
            if last:
                tokens, logprobs, _ = runner.step(group, x, True)
                row = ex.token_row(tokens, logprobs)
            else:
                row = ex.hidden_row(runner.step(group, x, False))
        prev = ex.exchange(row)
        mx.async_eval(prev)
        unread.append(prev)
        t1 = time.perf_counter()
        if len(unread) > LAG:  # the oldest tick is done or nearly: its control word is cheap to read
            announced = ex.end_of(unread.popleft())
            if announced >= 0:
                end = announced
        prof.tick(int(group is not None), t1 - t0, time.perf_counter() - t1, t0)
        if end is not None and tick >= end:
            if tick != end:
                raise RuntimeError(f"rank {rank}: run end {end} announced too late (tick {tick})")
            return tick + 1
        tick += 1


# -- rank 0 ----------------------------------------------------------------------------
def run_candidates(coord: Leader) -> list[Any]:
    """Groups a run can take: all of them when every sequence is decoding in one (none
    setting up, prefilling, joining or waiting to leave, none asking for top logprobs nor
    with a thinking budget still open),
    their caches trimmable. Otherwise [] and the message protocol goes on. The run starts
    once the ring is quiet: the coordinator stops sending steps until then."""
    if coord.link is None or coord.link.collective is None or coord.stopping:
        return []
    coord.admit()  # whoever still waits has no slot: a run does not hold them up
    if not coord.groups:
        return []
    if any(s.finished or s.group is None or s.logprobs or (s.think is not None and s.think.open_ended)
           for s in coord.seqs.values()):
        return []  # (a thinking budget may force tokens, which a run's ticks cannot)
    groups = [coord.groups[g] for g in sorted(coord.groups)]
    if not all(coord.runner.groups[g.gid].trimmable() for g in groups):
        return []
    return groups


def lead_run(coord: Leader, groups: list[Any]) -> None:
    """Rank 0's side of one run over `groups`: announce, tick until something needs the
    message protocol (a sequence finished, a new request, a cancel or stop), then trim."""
    link, runner = coord.link, coord.runner
    plan = RunPlan.deal([g.gid for g in groups], link.size)
    rows = {g.gid: list(g.rows) for g in groups}
    feed = {gid: mx.array([s.feed for s in r], dtype=mx.int32)[:, None] for gid, r in rows.items()}
    base = {gid: runner.groups[gid].size() for gid in rows}
    passes = dict.fromkeys(rows, 0)
    # tick 0's hidden state, built (lazily) first: the followers need its dtype
    first = plan.work_at(0, 0, link.size)
    hidden: mx.array | None = runner.step(first, feed[first], False)

    # The ring must be quiet before the collectives start (on CPU they share its sockets).
    words = plan.encode()
    mx.async_eval(link.send(header(OP_RUN, 0, len(words), 0, dtype_code(hidden.dtype)),
                            mx.array(words, dtype=mx.int32)))
    if int(link.recv_header()[0]) != OP_ACK:
        raise RuntimeError("rank 0: the RUN message did not come back as an ACK")

    ex = TickExchange(link.collective, int(runner.stage.config["hidden_size"]), _widest(runner, plan))
    size = ex.size
    unread: deque[tuple[mx.array, int | None]] = deque()

    def take(summed: mx.array, gid: int | None) -> None:
        if gid is None:
            mx.eval(summed)  # keeps rank 0 at most AHEAD ticks ahead
            return
        out = np.array(summed[size - 1, ex.tok_at:ex.tok_at + 2 * ex.g]).tolist()
        passes[gid] += 1
        for i, s in enumerate(rows[gid]):
            if not s.finished:
                s.feed = int(out[i])
                coord.accept(s, int(out[i]), float(out[ex.g + i]), None)

    tick, end = 0, None
    while True:
        if end is None and _should_end(coord, rows):
            end = tick + LAG
        gid = plan.work_at(0, tick, size)
        if tick > 0:
            hidden = None if gid is None else runner.step(gid, feed[gid], False)
        summed = ex.exchange(ex.hidden_row(hidden, OPEN if end is None else float(end)))
        mx.async_eval(summed)
        done = plan.work_at(size - 1, tick, size)  # the group whose tokens this tick brings
        if done is not None:
            feed[done] = ex.tokens_from(summed, len(rows[done]))
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

    # Passes cut off by the end left entries in some ranks' caches: cut every group back
    # to what its emitted tokens account for (a finished row leaves next, and a prefix
    # kept from it is cut, on reuse, to the part its tokens account for).
    keep = [(gid, base[gid] + passes[gid]) for gid in rows]
    words = [w for pair in keep for w in pair]
    for gid, length in keep:
        runner.groups[gid].trim(length)
    mx.async_eval(link.send(header(OP_TRIM, 0, len(words)), mx.array(words, dtype=mx.int32)))
    coord.expect_ack()


def _should_end(coord: Leader, rows: dict[int, list]) -> bool:
    coord.drain_commands(block=False)
    if coord.stopping or any(s.finished for r in rows.values() for s in r):
        return True
    # a new request that can start needs its prefill (admitted after the run: admitting may
    # free slots, and no message may cross the ring while it runs)
    return bool(coord.waiting) and len(coord.seqs) < coord.max_slots
