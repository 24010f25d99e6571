"""Rank 0's scheduler: which messages go round the ring, in what order (pipeline.py has
what each rank does with them).

Rank 0 owns the sequences. For each one it sends, in order, SETUP (sampling parameters:
every stage makes a cache for the slot, the last one a sampler), the prompt minus its last
token in chunks of `prefill_step` (as mlx-lm's generate_step does, so the floating-point
results match), then one FORWARD with FLAG_SAMPLE of the last prompt token, which brings
the first token. Then the sequence JOINs a group and decodes as one of its rows: one
FORWARD per group step carries every row (continuous batching, batch.py). When it ends it
LEAVEs its group (or, never having joined, its slot is FREEd).

Groups: with S stages the decoding rows are dealt over up to S groups (new rows join the
smallest), so that S group steps are in the ring at once, one per stage, each as wide as
it can be: pipelined micro-batches. With one stage there is one group, and its next step
is queued on the device before the current one's tokens are read (as mlx-lm's
BatchGenerator does), so no host round trip sits between two steps.

Prompts interleave with decoding: between two steps of a group at most `prefill_step`
tokens of prompt work run (one chunk of a long prompt, or the whole of several short
ones), so a long new prompt stalls the decoders for at most one chunk at a time. In a ring
at most one multi-token message is in flight: large sends block until the neighbour
receives, and a ring of blocked senders would deadlock.

One stage where queueing computes (MLX's CPU backend, `queue_computes`): a batched prompt
forward costs as much as the prompts one by one there, and only makes every prompt in it
wait for all of them. So prompts run one at a time in arrival order, each alternating with
one step of the decoding rows; a sequence joins its group as soon as only its last prompt
token is left, and that step samples its first token beside the others' next ones (no
forward of its own); and the step's tokens are read before the next prompt is queued.

With a collective group (`RingLink.collective`), once every sequence is decoding, rank 0
switches to lock-step runs over the groups (lockstep.py: RUN, ticks of all_sum, then TRIM).
"""

from __future__ import annotations

import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from mlxdist.runtime.api import SamplingParams, Thinking
from mlxdist.runtime.lockstep import lead_run, run_candidates
from mlxdist.runtime.pipeline import StageRunner
from mlxdist.runtime.prefix_cache import RetainedPrefixes, common_prefix
from mlxdist.runtime.sampling import MAX_TOP_LOGPROBS, decode_top, encode_params
from mlxdist.runtime.thinking import ThinkState
from mlxdist.runtime.ring_link import (
    FLAG_GROUP, FLAG_RETAIN, FLAG_REUSE, FLAG_SAMPLE, OP_ACK, OP_FORWARD, OP_FREE, OP_JOIN, OP_LEAVE, OP_MERGE,
    HEADER_WORDS, OP_MOVE, OP_PARK, OP_SETUP, OP_STOP, OP_TOKEN, OP_TRIM, RingLink, dtype_code, header,
    read_token,
)


@dataclass
class Sequence:
    req_id: int
    slot: int
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    logprobs: int = 0
    pos: int = 0  # prompt tokens sent (or found in a retained cache)
    reused: int = 0  # prompt tokens copied from a retained cache
    source: int = 0  # the retained slot they come from
    leader: "Sequence | None" = None  # a live sequence whose prompt starts the same: copy from it
    share: int = 0  # ... once it has run this many prompt tokens
    think: ThinkState | None = None  # its thinking section, when followed
    setup_sent: bool = False
    group: int | None = None  # the group it decodes in, once joined
    generated: int = 0
    last_token: int | None = None
    tokens: list[int] = field(default_factory=list)  # generated so far
    awaiting: int = 0  # steps in flight that bring a token of this sequence
    feed: Any = None  # its next step's input: a token id, or (lazy tokens, row) of a step in flight
    finished: bool = False
    freed: bool = False


@dataclass
class Group:
    gid: int
    rows: list[Sequence] = field(default_factory=list)  # in row order, as every stage has them
    inflight: int = 0  # steps of this group not yet answered


@dataclass
class _InFlight:
    op: int
    seq: Sequence | None = None  # a slot's message
    rows: list[Sequence] | None = None  # a group step: its rows when it was sent
    group: Group | None = None
    sample: bool = False
    tokens: int = 0  # prompt tokens it carries
    local: Any = None  # single stage: the lazy result
    reply: mx.array | None = None  # a ring: its reply's recv, posted early (chained)


Emit = Callable[[dict], None]
SHARE_MIN = 64  # prompt tokens in common with a live sequence worth waiting for (all of it always is)


@dataclass
class Coordinator:
    """Rank 0's loop. Commands (dicts) arrive on `commands`: {"t": "add", ...},
    {"t": "cancel", "id"}, {"t": "stop"}; events leave through `emit`:
    {"t": "token", "id", "tok", "lp"}, {"t": "end", "id"}.

    `max_slots` is the batch width: at most that many sequences at once, all of them
    decoding together."""

    runner: StageRunner
    link: RingLink | None  # None: a single stage in this process
    emit: Emit
    max_slots: int = 16
    prefill_step: int = 2048
    # Finished sequences whose caches stay on every rank, for a later prompt that starts
    # the same way (a chat's next turn, a repeated system prompt): prefix caching.
    prompt_cache: int = 0
    # most decoding groups at once; 0: one per stage. Stages that share one device (local
    # ranks on one GPU) gain nothing from micro-batches in flight together: they run one
    # group, as wide as it gets (worker.py)
    groups: int = 0
    commands: "queue.Queue[dict]" = field(default_factory=queue.Queue)
    stats: dict[str, float] = field(default_factory=lambda: {"tokens": 0, "steps": 0, "bytes_sent": 0})

    def __post_init__(self) -> None:
        self.num_stages = 1 if self.link is None else self.link.size
        # a ring's slot messages in flight (setups, chunks, first steps): room for a new
        # sequence's setup, one chunk and its first step back to back, plus one per stage
        self.max_inflight = self.num_stages + 2
        # one stage on MLX's CPU backend, which computes as work is queued (async_eval
        # returns when it is nearly done) and is compute bound at any batch: prompts run
        # one at a time (a prompt batch saves nothing there and makes every prompt in it
        # wait for all of them), each sequence's last prompt token rides in its group's
        # next step, and a step's tokens are read before the next prompt's work is queued
        self.queue_computes = self.link is None and queue_computes()
        # one group per stage when rows can share a forward; else each row is its own group
        self.max_groups = (self.groups or self.num_stages) if self.runner.batchable else self.max_slots
        self.seqs: dict[int, Sequence] = {}
        self.groups: dict[int, Group] = {}
        self.free_slots = list(range(self.max_slots + self.prompt_cache - 1, -1, -1))
        self.retained = RetainedPrefixes()
        self.waiting: deque[dict] = deque()
        self.inflight: deque[_InFlight] = deque()
        self.stopping = False
        self.kicks = 0  # "add" and "stop" commands seen: the engine wakes parked ranks per each
        self.parked = True  # followers start waiting for a wake-up
        self.vocab = int(self.runner.stage.config.get("vocab_size") or 0)

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        while True:
            idle = not self.inflight and not self._has_work()
            if idle and not self.parked and not self.stopping and self._park():
                continue
            self.drain_commands(block=idle)
            if self.stopping and not self.inflight and not self.seqs:
                for slot in self.retained:  # every rank drops its caches as it stops
                    self.runner.free(slot)
                self._shutdown_ring()
                return
            if groups := run_candidates(self):  # a lock-step run is due: drain the ring, then run
                if self.inflight:
                    self._receive_one()
                else:
                    lead_run(self, groups)
                continue
            self._issue()
            if self.inflight:
                self._receive_one()

    def _park(self) -> bool:
        """Nothing to do: tell the followers to wait for the engine's wake-up rather than
        in a ring recv (which the backend serves by polling a core)."""
        if self.link is None:
            return False
        self.parked = True
        mx.async_eval(self.link.send(header(OP_PARK, 0, tag=self.kicks)))
        self.inflight.append(_InFlight(OP_PARK))
        return True

    def drain_commands(self, block: bool) -> None:
        try:
            cmd = self.commands.get(timeout=0.2) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._command(cmd)
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                break

    def _command(self, cmd: dict) -> None:
        t = cmd["t"]
        if t in ("add", "stop"):
            self.kicks += 1
            self.parked = False
        if t == "add":
            self.waiting.append(cmd)
        elif t == "cancel":
            if any(c["id"] == cmd["id"] for c in self.waiting):  # never admitted: done at once
                self.waiting = deque(c for c in self.waiting if c["id"] != cmd["id"])
                self.emit({"t": "end", "id": cmd["id"]})
            for s in self.seqs.values():
                if s.req_id == cmd["id"]:
                    s.finished = True
        elif t == "stop":
            self.stopping = True
            self.waiting.clear()
            for s in self.seqs.values():
                s.finished = True

    def admit(self) -> None:
        # Slots are max_slots + prompt_cache: with fewer than max_slots active and at most
        # prompt_cache retained one is free, unless retained sources wait for their copy.
        while self.waiting and len(self.seqs) < self.max_slots and not self.stopping:
            if not self.free_slots and not self._evict_retained(len(self.retained) - 1):
                return  # every retained slot is the source of a prefix not yet copied
            c = self.waiting.popleft()
            p = c.get("params") or {}
            prompt = list(c["prompt"])
            source, keep = self.retained.find(prompt)
            if keep:
                self.stats["reused_tokens"] = self.stats.get("reused_tokens", 0) + keep
            think = c.get("think")
            seq = Sequence(req_id=c["id"], slot=self.free_slots.pop(), prompt=prompt, pos=keep, reused=keep,
                           source=source, max_tokens=int(c["max_tokens"]), params=SamplingParams(**p),
                           seed=int(c["seed"]), stop_ids=frozenset(c.get("stop_ids", ())),
                           logprobs=int(c.get("logprobs", 0)),
                           think=ThinkState.start(Thinking(tuple(think["open"]), tuple(think["close"]),
                                                           bool(think["inside"]), think["budget"]))
                           if think else None)
            seq.leader, seq.share = self._live_prefix(prompt, keep)
            self.seqs[seq.slot] = seq

    def _live_prefix(self, prompt: list[int], keep: int) -> tuple[Sequence | None, int]:
        """A running sequence whose prompt starts as `prompt` does, for more than the `keep`
        tokens a retained prefix gives: the new one copies that part of its caches (from its
        slot, or its row in a group) instead of running it again, so n choices of one
        prompt run it once. Only the whole prompt, or a long part of it, is worth waiting
        for while the other's prompt runs."""
        best, share = None, keep
        for s in self.seqs.values():
            if s.finished or not self._trimmable(s):
                continue
            n = common_prefix(prompt, s.prompt, min(len(prompt), len(s.prompt)) - 1)
            if n > share and (n == len(prompt) - 1 or n >= SHARE_MIN):
                best, share = s, n
        return (best, share) if best is not None else (None, 0)

    def _trimmable(self, s: Sequence) -> bool:
        if s.group is not None:
            return self.runner.groups[s.group].trimmable()
        caches = self.runner.caches.get(s.slot)
        return caches is None or all(c.is_trimmable() for c in caches)

    def _has_work(self) -> bool:
        self._retire_finished()
        self.admit()
        return (any(s.finished or self._next_op(s) is not None or self._can_join(s) for s in self.seqs.values())
                or any(self._step_ready(g) for g in self.groups.values()))

    def _retire_finished(self) -> None:
        """Free (or retain) finished sequences before admitting new ones: a client that
        sends its next turn as soon as it has the last token must find this one retained.
        Also before a group step: it must not carry rows that have ended."""
        for s in [s for s in self.seqs.values() if s.finished and not s.freed]:
            self._send_free(s)

    def _next_op(self, s: Sequence) -> str | None:
        """The slot message `s` needs next (its group's steps are not slot messages)."""
        if s.finished or s.group is not None:
            return None
        if not s.setup_sent:
            if s.leader is not None:
                lead = s.leader
                if lead.freed:  # it went before its prompt got that far: run our own
                    s.leader, s.share = None, 0
                elif not (lead.setup_sent and lead.pos >= s.share):
                    return None  # its prompt has not run that far yet
            return "setup"
        if len(s.prompt) - s.pos > 1:
            return "chunk"
        if s.generated == 0 and not s.awaiting and not self._first_in_group():
            return "first"
        return None

    def _can_join(self, s: Sequence) -> bool:
        """`s` joins a group once its first token is out, or (_first_in_group) once only
        its last prompt token is left: that token then runs in the group's next step
        beside the decoding rows, which samples its first token too."""
        if s.finished or s.group is not None or s.awaiting:
            return False
        return s.generated > 0 or (self._first_in_group() and s.setup_sent and len(s.prompt) - s.pos == 1)

    def _first_in_group(self) -> bool:
        """Whether a sequence's first token comes from its group's step (queue_computes,
        rows batchable) rather than from a FORWARD of its last prompt token alone."""
        return self.queue_computes and self.runner.batchable

    def _step_ready(self, g: Group) -> bool:
        """A group's next step can go: none of its steps in flight, or one whose tokens feed
        the next while still lazy (chained: one stage; or a ring whose ranks poll, with this
        group alone in it), unless a row is at its last token (its next step would be
        wasted) or prompts wait."""
        if not g.rows or self.stopping:
            return False
        if g.inflight == 0:
            return True
        if g.inflight > 1 or self._prompts_pending() or any(s.generated + s.awaiting >= s.max_tokens for s in g.rows):
            return False
        if any(s.think is not None and s.think.free_steps() < s.awaiting for s in g.rows):
            return False  # a token in flight may be replaced by a forced one: it cannot feed the next step
        return self.link is None or self._ring_chains(g)

    def _ring_chains(self, g: Group) -> bool:
        """A ring may chain a group's steps where its ranks poll (with select() a recv must
        not be posted before data is there), the group is alone (otherwise another group
        keeps the stages busy), no row wants top logprobs (their reply size varies), lock-
        step runs do not take over, and the one message in flight is its step, with the
        same rows."""
        if self.link.wait_on or self.link.collective is not None or len(self.groups) != 1:
            return False
        if len(self.inflight) != 1:  # the reply to post for must be the next one to come
            return False
        last = self.inflight[0]
        return (last.group is g and last.rows is not None and len(last.rows) == len(g.rows)
                and all(a is b for a, b in zip(last.rows, g.rows)) and not any(s.logprobs for s in g.rows))

    def _prompts_pending(self) -> bool:
        """A sequence is still on its way to its first token: the next group step waits
        behind its prompt work instead of being queued ahead of it (its time to first
        token)."""
        return any(s.group is None and not s.finished for s in self.seqs.values())

    def _issue(self) -> None:
        """Send what can go now: frees and leaves first, then merges and joins, setups,
        new prompts together, the groups' steps, and slot messages (prompt chunks, first
        steps) while there is room."""
        self._retire_finished()
        self.admit()
        self._merge_groups()
        self._rebalance()
        if self.queue_computes:  # one prompt's work (a chunk), then it joins and the step goes
            while self._send_slot_message():
                pass
        for s in sorted(self.seqs.values(), key=lambda s: s.slot):
            if self._can_join(s):
                self._send_join(s)
        while self._send_slot_message(only="setup"):
            pass
        self._prefill_together()
        for g in list(self.groups.values()):
            while self._step_ready(g):  # one stage: the next step queued behind the current
                self._send_group_step(g)
        while self._send_slot_message():
            pass

    def _send_slot_message(self, only: str | None = None) -> bool:
        """The next slot message with room: first steps before anything (each ends a wait
        for a first token), then prompt work in order of arrival (a sequence's setup and
        chunks before the next one's, which brings first tokens soonest)."""
        ops = [(op, s) for s in sorted(self.seqs.values(), key=lambda s: s.req_id)
               if (op := self._next_op(s)) is not None and only in (None, op)]
        for op, s in sorted(ops, key=lambda o: o[0] != "first"):
            if self._room_for(op, s):
                getattr(self, f"_send_{op}")(s)
                return True
        return False

    def _prompt_work(self) -> list[_InFlight]:
        """Messages in flight that are not group steps: slot messages and prompt batches."""
        return [f for f in self.inflight if f.seq is not None or f.tokens]

    def _room_for(self, op: str, s: Sequence) -> bool:
        """Whether slot message `op` of `s` may go now. One stage: while the prompt tokens
        queued stay within one chunk (a lone chunk always may), for two sequences at most;
        with queue_computes, only when nothing is in flight.
        A ring: while fewer than max_inflight slot messages are out, and one multi-token
        message at a time."""
        n = 0 if op == "setup" else len(s.prompt) - s.pos if op == "first" else min(
            self.prefill_step, len(s.prompt) - s.pos - 1)
        slot_msgs = self._prompt_work()
        if self.link is not None:
            return len(slot_msgs) < self.max_inflight and not (n > 1 and any(f.tokens > 1 for f in slot_msgs))
        if op == "setup":
            return True  # no device work here
        if self.queue_computes:  # one sequence's, and not queued behind a step (whose tokens wait)
            return not self.inflight
        queued = sum(f.tokens for f in slot_msgs)
        # and prompt work of at most two sequences at once: the next one's is queued while
        # this one's first token is read (where queueing computes, as on MLX's CPU backend,
        # the first token of one is not held back by the prompts of all the others)
        ahead = {f.seq.req_id if f.seq else -1 for f in slot_msgs if f.tokens} | {s.req_id}
        return (queued == 0 or queued + n <= self.prefill_step) and len(ahead) <= 2

    # -- what rank 0 sends ------------------------------------------------------------
    def _send_setup(self, s: Sequence) -> None:
        if s.leader is not None:  # its prompt's first `share` tokens: a copy of the leader's caches
            s.reused = s.pos = s.share
            s.source = s.leader.slot
            self.stats["prefix_shared"] = self.stats.get("prefix_shared", 0) + 1
            self.stats["shared_tokens"] = self.stats.get("shared_tokens", 0) + s.share
        elif len(s.prompt) - s.pos > 1:
            self.stats["prefills"] = self.stats.get("prefills", 0) + 1  # it runs (part of) its prompt
        words = encode_params(s.params, s.seed, s.logprobs, s.prompt)
        self.runner.setup(s.slot, words, s.reused if s.reused else None, s.source)
        s.setup_sent = True
        if self.link is not None:
            head = header(OP_SETUP, s.slot, len(words), FLAG_REUSE if s.reused else 0, value=s.reused,
                          aux=s.source)
            mx.async_eval(self.link.send(head, mx.array(words)))
        self.inflight.append(_InFlight(OP_SETUP, s))

    def _send_chunk(self, s: Sequence) -> None:
        n = min(self.prefill_step, len(s.prompt) - s.pos - 1)
        tokens = s.prompt[s.pos:s.pos + n]
        s.pos += n
        self.stats["prefill_chunks"] = self.stats.get("prefill_chunks", 0) + 1
        self._forward(s, tokens, sample=False)

    def _send_first(self, s: Sequence) -> None:
        """The last prompt token, alone in the slot's caches: its reply is the first token."""
        tokens, s.pos = s.prompt[s.pos:], len(s.prompt)
        s.awaiting += 1
        self._forward(s, tokens, sample=True)

    def _forward(self, s: Sequence, tokens: list[int], sample: bool) -> None:
        x = mx.array(tokens, dtype=mx.int32)[None]
        if self.link is None:
            out = self.runner.forward(s.slot, x, sample)
            mx.async_eval([o for o in out if o is not None])
            self.inflight.append(_InFlight(OP_FORWARD, s, sample=sample, tokens=len(tokens), local=out))
            return
        h = self.runner.forward(s.slot, x, False)
        head = header(OP_FORWARD, s.slot, len(tokens), FLAG_SAMPLE if sample else 0, dtype_code(h.dtype))
        mx.async_eval(self.link.send(head, h))
        self.inflight.append(_InFlight(OP_FORWARD, s, sample=sample, tokens=len(tokens)))

    def _send_join(self, s: Sequence) -> None:
        g = self._group_for_new_row()
        s.group = g.gid
        s.feed = s.last_token if s.generated else s.prompt[-1]  # (one stage: its last prompt token)
        g.rows.append(s)
        self.runner.join(g.gid, s.slot)
        if self.link is not None:
            mx.async_eval(self.link.send(header(OP_JOIN, g.gid, value=s.slot)))

    def _group_for_new_row(self) -> Group:
        """Up to max_groups groups (one per stage); a new row joins the smallest."""
        if len(self.groups) < self.max_groups:
            return self._new_group()
        return min(self.groups.values(), key=lambda g: (len(g.rows), g.gid))

    def _new_group(self) -> Group:
        gid = min(set(range(len(self.groups) + 1)) - set(self.groups))
        self.groups[gid] = Group(gid)
        return self.groups[gid]

    def _prefill_together(self) -> None:
        """New sequences whose remaining prompt fits the room for prompt work (at least
        two): they join a fresh group before their prompts run, and one right-padded
        forward runs them all (as mlx-lm's prompt batches do); the group's first step
        then samples their first tokens, and it is merged into another group later."""
        if not self.runner.batchable or self.stopping or self.queue_computes:
            return
        busy = self._prompt_work()
        if self.link is not None and any(f.tokens > 1 for f in busy):
            return  # one multi-token message in the ring at a time
        room = self.prefill_step - sum(f.tokens for f in busy)
        rows = []
        for s in sorted(self.seqs.values(), key=lambda s: s.req_id):
            n = len(s.prompt) - s.pos - 1
            if (s.setup_sent and s.group is None and not s.finished and s.generated == 0 and not s.awaiting
                    and 0 <= n <= room and not any(f.seq is s and f.tokens for f in busy)):
                rows.append(s)
                room -= n
        # rows whose prompt is all in a retained prefix but its last token need no forward:
        # a group of their own, so their first tokens do not wait for the others' prompts
        left = lambda s: len(s.prompt) - s.pos - 1  # noqa: E731
        for part in ([s for s in rows if not left(s)], [s for s in rows if left(s)]):
            if len(part) >= 2:
                self._prompt_group(part, [left(s) for s in part])

    def _prompt_group(self, rows: list[Sequence], lengths: list[int]) -> None:
        """`rows` join a fresh group with `lengths` prompt tokens each still to run, which
        one padded forward then runs (if any)."""
        g = self._new_group()
        for s, n in zip(rows, lengths):
            s.group, s.feed, s.pos = g.gid, s.prompt[-1], len(s.prompt) - 1
            g.rows.append(s)
            self.runner.join(g.gid, s.slot, n)
            if self.link is not None:
                mx.async_eval(self.link.send(header(OP_JOIN, g.gid, n, value=s.slot)))
        self.stats["prompts_together"] = self.stats.get("prompts_together", 0) + len(rows)
        if any(lengths):
            self._forward_prompts(g, [s.prompt[len(s.prompt) - 1 - n:-1] for s, n in zip(rows, lengths)])

    def _forward_prompts(self, g: Group, prompts: list[list[int]]) -> None:
        """One forward of the group's rows' prompt tokens, right-padded."""
        width = max(len(p) for p in prompts)
        x = mx.array([p + [0] * (width - len(p)) for p in prompts], dtype=mx.int32)
        n = sum(len(p) for p in prompts)
        if self.link is None:
            out = self.runner.step(g.gid, x, False)
            mx.async_eval(out)
            self.inflight.append(_InFlight(OP_FORWARD, group=g, tokens=n, local=out))
            return
        h = self.runner.step(g.gid, x, False)
        mx.async_eval(self.link.send(header(OP_FORWARD, g.gid, width, FLAG_GROUP, dtype_code(h.dtype)), h))
        self.inflight.append(_InFlight(OP_FORWARD, group=g, tokens=n))

    def _merge_groups(self) -> None:
        """More groups than max_groups (new prompts run together in their own): once every
        row of the smallest has had a step, it joins the next smallest."""
        while len(self.groups) > self.max_groups:
            small = sorted(self.groups.values(), key=lambda g: (len(g.rows), -g.gid))
            a, b = small[0], small[1]
            if not all(s.generated or s.awaiting for s in a.rows):
                return
            self.runner.merge(b.gid, a.gid)
            if self.link is not None:
                mx.async_eval(self.link.send(header(OP_MERGE, b.gid, value=a.gid)))
            for s in a.rows:
                s.group = b.gid
            b.rows += a.rows
            b.inflight += a.inflight
            for f in self.inflight:  # its steps in flight now count for b
                if f.group is a:
                    f.group = b
            del self.groups[a.gid]
            self.stats["merges"] = self.stats.get("merges", 0) + 1

    def _rebalance(self) -> None:
        """Keep the groups of a pipeline even as rows come (a prompt batch is one group)
        and go: while a group with no step in flight has two rows more than the smallest
        (or than none, with fewer groups than stages), its last row MOVEs there."""
        if self.max_groups < 2 or self.stopping:
            return
        while True:
            groups = sorted(self.groups.values(), key=lambda g: len(g.rows))
            big = groups[-1] if groups else None
            if big is None or big.inflight or any(s.awaiting for s in big.rows):
                return
            small_n = 0 if len(groups) < self.max_groups else len(groups[0].rows)
            if len(big.rows) - small_n < 2:
                return
            small = self._new_group() if len(groups) < self.max_groups else groups[0]
            s = big.rows.pop()
            self.runner.move(big.gid, s.slot, small.gid)
            if self.link is not None:
                mx.async_eval(self.link.send(header(OP_MOVE, big.gid, value=s.slot, aux=small.gid)))
            s.group = small.gid
            small.rows.append(s)
            self.stats["moves"] = self.stats.get("moves", 0) + 1

    def _send_group_step(self, g: Group) -> None:
        rows = list(g.rows)
        if self.link is not None and g.inflight:  # chained: fed by the posted reply's tokens
            f = self.inflight[0]
            f.reply = self.link.recv_payload((self._reply_words(rows),), mx.int32)
            x = f.reply[HEADER_WORDS:HEADER_WORDS + len(rows)][:, None]
            self.stats["chained"] = self.stats.get("chained", 0) + 1
        else:
            x = _feed(rows)
        for s in rows:
            s.awaiting += 1
            s.pos = len(s.prompt)  # a row that joined before its prompt ran feeds its last token now
        if self.link is None:
            out = self.runner.step(g.gid, x, True)
            mx.async_eval([o for o in out if o is not None])
            for i, s in enumerate(rows):
                s.feed = (out[0], i)
        else:
            out = None
            h = self.runner.step(g.gid, x, False)
            head = header(OP_FORWARD, g.gid, 1, FLAG_SAMPLE | FLAG_GROUP, dtype_code(h.dtype))
            mx.async_eval(self.link.send(head, h))
        g.inflight += 1
        self.stats["rows"] = self.stats.get("rows", 0) + len(rows)
        self.stats["widest"] = max(self.stats.get("widest", 0), len(rows))
        self.inflight.append(_InFlight(OP_FORWARD, rows=rows, group=g, sample=True, local=out))

    def _send_free(self, s: Sequence) -> None:
        """`s` has ended: it leaves its group (or its slot is freed), its caches kept when
        prefix caching wants them, and the engine hears its end."""
        s.freed = True
        del self.seqs[s.slot]
        # the caches hold the prompt and every generated token but the last (never fed);
        # anything past that (a chained or lock-step step after the end) is trimmed on reuse
        held = s.prompt[:s.pos] + s.tokens[:-1]
        retain = bool(self.prompt_cache and s.setup_sent and held and not self.stopping and self._trimmable(s))
        if s.group is not None:
            self._send_leave(s, retain)
        self.stats["kv_bytes"] = self.runner.kv_bytes()  # this rank's caches, for the console
        self.emit({"t": "end", "id": s.req_id, "stats": dict(self.stats)})  # counters for /metrics
        if retain:
            self.retained.add(s.slot, held)
            self._evict_retained(self.prompt_cache)
        elif s.group is not None:
            self.free_slots.append(s.slot)
        else:
            self._free_slot(s.slot)

    def _send_leave(self, s: Sequence, retain: bool) -> None:
        g = self.groups[s.group]
        g.rows.remove(s)
        self.runner.leave(g.gid, s.slot, retain)
        if self.link is not None:
            mx.async_eval(self.link.send(header(OP_LEAVE, g.gid, flags=FLAG_RETAIN if retain else 0, value=s.slot)))
        if not g.rows:
            del self.groups[g.gid]  # its steps still in flight answer through their records
        if not retain:
            mx.clear_cache()

    def _evict_retained(self, keep: int) -> bool:
        """Free the least recently used retained slots until `keep` are left, sparing the
        sources of prefixes that a waiting SETUP is still to copy; True if any went."""
        pinned = {s.source for s in self.seqs.values() if s.reused and not s.setup_sent}
        victims = self.retained.victims(keep, pinned)
        for slot in victims:
            self._free_slot(slot)
        return bool(victims)

    def _free_slot(self, slot: int) -> None:
        self.retained.discard(slot)
        self.runner.free(slot)
        if self.link is not None:
            mx.async_eval(self.link.send(header(OP_FREE, slot)))
        self.inflight.append(_InFlight(OP_FREE))
        self.free_slots.append(slot)
        mx.clear_cache()

    def expect_ack(self) -> None:
        """A message was sent outside the scheduler (lock-step's TRIM): its ACK comes back in turn."""
        self.inflight.append(_InFlight(OP_TRIM))

    def _shutdown_ring(self) -> None:
        if self.link is not None:
            mx.eval(self.link.send(header(OP_STOP, 0)))
            self.link.recv_header()

    # -- what comes back --------------------------------------------------------------
    def _receive_one(self) -> None:
        f = self.inflight.popleft()
        if f.rows is not None:
            self._receive_group_step(f)
            return
        if self.link is None:
            if not f.sample:
                # a prompt chunk: wait for it, so that the next one is sent (or, once the
                # request is cancelled, not sent) only after it; otherwise every chunk of
                # every prompt would be queued on the device at once and a cancel could not
                # cut the prefill short
                if f.local is not None:
                    mx.eval(f.local)
                return
            token_arr, lp_arr, top_arr = f.local
            token, logprob = int(token_arr.item()), float(lp_arr.item())
            top = decode_top(np.array(top_arr)) if top_arr is not None else None
        else:
            h = self._recv_reply()
            if int(h[0]) != OP_TOKEN:
                return
            token, logprob = read_token(h)
            top = None
            if int(h[2]) > 0:
                words = self.link.recv_payload((2 * int(h[2]),), mx.int32)
                mx.eval(words)
                top = decode_top(np.array(words))
        s = f.seq
        if s is None:
            return
        s.awaiting -= 1
        if not s.finished:
            self.accept(s, token, logprob, top)

    def _recv_reply(self) -> np.ndarray:
        t_wait = time.perf_counter()
        h = self.link.recv_header()
        self.stats["wait_s"] = self.stats.get("wait_s", 0.0) + time.perf_counter() - t_wait
        self.stats["bytes_sent"] = self.link.bytes_sent
        if int(h[0]) not in (OP_TOKEN, OP_ACK):
            raise RuntimeError(f"rank 0 got unexpected op {int(h[0])} from the last stage")
        return h

    def _receive_group_step(self, f: _InFlight) -> None:
        rows = f.rows
        b = len(rows)
        if self.link is None:
            tokens, lps, top = f.local
            mx.eval(tokens, lps, *([top] if top is not None else []))
            toks, lp = np.array(tokens).tolist(), np.array(lps).tolist()
            top_words = np.array(top) if top is not None else np.zeros((0,), np.int32)
        else:
            n = self._reply_words(rows)
            if f.reply is not None:  # chained: its recv was posted when the next step was sent
                mx.eval(f.reply)
                msg = np.array(f.reply)
            else:
                t_wait = time.perf_counter()
                msg = self.link.recv_words(n)
                self.stats["wait_s"] = self.stats.get("wait_s", 0.0) + time.perf_counter() - t_wait
            self.stats["bytes_sent"] = self.link.bytes_sent
            h, w = msg[:HEADER_WORDS], msg[HEADER_WORDS:]
            if int(h[0]) != OP_TOKEN or not int(h[3]) & FLAG_GROUP or int(h[2]) != n - HEADER_WORDS:
                raise RuntimeError(f"rank 0 expected a group's {n - HEADER_WORDS} token words from the last "
                                   f"stage, got header {h.tolist()}")
            toks, lp = w[:b].tolist(), w[b:2 * b].view(np.float32).tolist()
            top_words = w[2 * b:]
        f.group.inflight -= 1
        self.stats["steps"] += 1
        at = 0
        for i, s in enumerate(rows):
            top = None
            if s.logprobs > 0:
                k = self._top_words(s)
                top, at = decode_top(top_words[at:at + k]), at + k
            s.awaiting -= 1
            if s.finished:
                continue
            token = self.accept(s, int(toks[i]), float(lp[i]), top)
            if s.awaiting == 0:
                s.feed = token

    def _reply_words(self, rows: list[Sequence]) -> int:
        """The size of a group step's reply: header, B tokens, B logprobs, the top logprobs
        of the rows that asked."""
        return HEADER_WORDS + 2 * len(rows) + sum(self._top_words(s) for s in rows)

    def _top_words(self, s: Sequence) -> int:
        """The words of `s`'s top logprobs in a reply (ids and values, as the last stage's
        sampler caps them), 0 if it asked for none."""
        return 2 * min(s.logprobs, MAX_TOP_LOGPROBS, self.vocab or MAX_TOP_LOGPROBS) if s.logprobs > 0 else 0

    def accept(self, s: Sequence, token: int, logprob: float, top: list | None) -> int:
        """A token of `s` came back: hand it out (or, its thinking budget spent, the forced
        closing token in its place); finish the sequence at its end. Returns the token
        that `s` goes on from."""
        thinking = False
        if s.think is not None:
            sampled = token
            token, thinking = s.think.take(token)
            if token != sampled:
                logprob, top = 0.0, None
                self.stats["forced_tokens"] = self.stats.get("forced_tokens", 0) + 1
        s.generated += 1
        s.tokens.append(token)
        s.last_token = token
        self.stats["tokens"] += 1
        ev = {"t": "token", "id": s.req_id, "tok": token, "lp": logprob}
        if top is not None:
            ev["top"] = [[i, v] for i, v in top]
        if thinking:
            ev["th"] = 1
        self.emit(ev)
        if s.generated >= s.max_tokens or token in s.stop_ids:
            s.finished = True
        return token


def queue_computes() -> bool:
    """Whether queueing work computes it (MLX's CPU backend) rather than hands it to a
    device that runs beside the host."""
    return mx.default_device() == mx.cpu


def _feed(rows: list[Sequence]) -> mx.array:
    """A group step's input [B, 1]: each row's last token, a host int or (one stage) the
    lazy output of the step still in flight, which then is used as it is."""
    first = rows[0].feed
    if isinstance(first, tuple) and first[0].shape[0] == len(rows) and all(
            isinstance(s.feed, tuple) and s.feed[0] is first[0] and s.feed[1] == i for i, s in enumerate(rows)):
        return first[0][:, None]
    parts = [s.feed[0][s.feed[1]:s.feed[1] + 1] if isinstance(s.feed, tuple) else mx.array([s.feed], mx.int32)
             for s in rows]
    return mx.concatenate(parts)[:, None]
