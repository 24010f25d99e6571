"""The stage loop: what every rank does with each message, and the scheduler on rank 0.

Rank 0 owns the sequences. For each one it sends, in order, SETUP (sampling parameters:
every stage makes a cache for the slot, the last one a sampler), the prompt minus its last
token in chunks of `prefill_step` (as mlx-lm's generate_step does, so the floating-point
results match), then one FORWARD per token with FLAG_SAMPLE, and finally FREE. Each message
goes round the ring once: rank 0 embeds and runs its layers, each stage runs its layers and
passes the hidden state on, the last stage runs the head, samples, and sends only a header
with the token id back to rank 0. Every message rank 0 sends comes back exactly once (a
token or an ACK), in order, so rank 0 knows what each reply belongs to.

With a collective group (`RingLink.collective`), once every sequence is decoding, rank 0
switches to lock-step runs (lockstep.py: RUN, ticks of all_sum, then TRIM), which need no
header per step; setup, prompts and frees always take the messages described here.

Several sequences are in the ring at once, one message each, so with N stages and N
requests every stage has work: pipelined decoding. Prompt chunks of one sequence need not
wait for each other (stage order keeps the cache order), but a decode step waits for the
token before it. At most one multi-token message is in the ring at a time: large sends
block until the neighbour receives, and a ring of blocked senders would deadlock.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from mlxdist.runtime.api import SamplingParams
from mlxdist.runtime.lockstep import follow_run, lead_run, run_candidates
from mlxdist.runtime.prefix_cache import RetainedPrefixes, copy_caches, trim_caches
from mlxdist.runtime.profile import StepProfile
from mlxdist.runtime.sampling import SlotSampler, decode_top, encode_params
from mlxdist.runtime.stage import Stage
from mlxdist.runtime.wire import (
    DTYPES, FLAG_REUSE, FLAG_SAMPLE, OP_ACK, OP_FORWARD, OP_FREE, OP_PARK, OP_RUN, OP_SETUP, OP_STOP, OP_TOKEN, OP_TRIM,
    RingLink, dtype_code, header, read_token, token_header,
)


class StageRunner:
    """One rank's layers plus the caches (and, on the last stage, the samplers) of the
    slots it has been told about. Caches live only here; nothing else holds them."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.caches: dict[int, list[Any]] = {}
        self.samplers: dict[int, SlotSampler] = {}

    def setup(self, slot: int, words: np.ndarray, keep: int | None = None, source: int = 0) -> None:
        """A new sequence in `slot`: fresh caches, or (`keep`) a copy of the retained
        `source` slot's caches cut to their first `keep` positions (a prompt prefix rank 0
        found there; the source stays for other requests)."""
        if keep is None:
            self.caches[slot] = self.stage.make_cache()
        else:
            self.caches[slot] = copy_caches(self.caches[source], keep)
        if self.stage.spec.is_last:
            self.samplers[slot] = SlotSampler.decode(words)

    def free(self, slot: int) -> None:
        self.caches.pop(slot, None)
        self.samplers.pop(slot, None)

    def cache_len(self, slot: int) -> int:
        return int(self.caches[slot][0].offset)

    def trim(self, slot: int, length: int) -> None:
        trim_caches(self.caches[slot], length)

    def forward(self, slot: int, x: mx.array, sample: bool) -> Any:
        cache = self.caches[slot]
        if self.stage.spec.is_last and sample:
            logits = self.stage.forward(x, cache, logits=True)[:, -1, :]
            return self.samplers[slot].sample(logits)
        h = self.stage.forward(x, cache)
        if self.stage.spec.is_last:  # prompt chunk: only the cache matters (as in mlx-lm)
            return [c.state for c in cache]
        return h


def follower_loop(runner: StageRunner, link: RingLink, hidden_size: int,
                  wait_for_wake: Callable[[int], None] = lambda kicks: None) -> None:
    """Ranks 1..N-1: receive, compute, pass on, until STOP. On PARK (rank 0 has nothing to
    do) the rank waits for the engine's wake-up instead of sitting in a ring recv, which
    the ring backend serves by polling a core."""
    last = runner.stage.spec.is_last
    prof = StepProfile(link.rank)
    while True:
        t0 = time.perf_counter()
        h = link.recv_header()
        t1 = time.perf_counter()
        op, slot, n, flags, dt, tag = (int(v) for v in (h[0], h[1], h[2], h[3], h[4], h[7]))
        if op == OP_SETUP:
            words = link.recv_payload((n,), mx.int32)
            mx.eval(words)
            runner.setup(slot, np.array(words), int(h[5]) if flags & FLAG_REUSE else None, int(h[6]))
            sends = link.send(header(OP_ACK, slot, tag=tag)) if last else link.send(mx.array(h), words)
            mx.async_eval(sends)
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
            for slot_, length in np.array(words).reshape(-1, 2).tolist():
                runner.trim(slot_, length)
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
    setup_sent: bool = False
    generated: int = 0
    last_token: int | None = None
    tokens: list[int] = field(default_factory=list)  # generated so far
    awaiting: int = 0  # sampling steps of this sequence in the ring (1, or 2 when chained)
    finished: bool = False
    freed: bool = False


@dataclass
class _InFlight:
    seq: Sequence | None
    op: int
    sample: bool = False
    large: bool = False
    local: Any = None  # single-stage: the lazy result
    reply: mx.array | None = None  # its reply's recv, when already posted (chained step)
    chained: bool = False  # the sequence's next step is already queued behind this one


Emit = Callable[[dict], None]


@dataclass
class Coordinator:
    """Rank 0's loop. Commands (dicts) arrive on `commands`: {"t": "add", ...},
    {"t": "cancel", "id"}, {"t": "stop"}; events leave through `emit`:
    {"t": "token", "id", "tok", "lp"}, {"t": "end", "id"}."""

    runner: StageRunner
    link: RingLink | None  # None: a single stage in this process
    emit: Emit
    max_slots: int = 16
    prefill_step: int = 2048
    # Finished sequences whose caches stay on every rank, for a later prompt that starts
    # the same way (a chat's next turn, a repeated system prompt): prefix caching.
    prompt_cache: int = 0
    commands: "queue.Queue[dict]" = field(default_factory=queue.Queue)
    stats: dict[str, float] = field(default_factory=lambda: {"tokens": 0, "steps": 0, "bytes_sent": 0})

    def __post_init__(self) -> None:
        self.num_stages = 1 if self.link is None else self.link.size
        self.max_inflight = self.num_stages + 1
        self.seqs: dict[int, Sequence] = {}
        self.free_slots = list(range(self.max_slots + self.prompt_cache - 1, -1, -1))
        self.retained = RetainedPrefixes()
        self.waiting: deque[dict] = deque()
        self.inflight: deque[_InFlight] = deque()
        self.stopping = False
        self._rr = 0
        self.kicks = 0  # "add" and "stop" commands seen: the engine wakes parked ranks per each
        self.parked = True  # followers start waiting for a wake-up

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        while True:
            idle = not self.inflight and not self._has_work()
            if idle and not self.parked and not self.stopping and self._park():
                continue
            self._drain_commands(block=idle)
            if self.stopping and not self.inflight and not self.seqs:
                for slot in self.retained:  # every rank drops its caches as it stops
                    self.runner.free(slot)
                self._shutdown_ring()
                return
            if not self.inflight and (seqs := run_candidates(self)):
                lead_run(self, seqs)
                continue
            while len(self.inflight) < self.max_inflight and self._inject_one():
                pass
            self._chain_next_step()
            if self.inflight:
                self._receive_one()

    def _park(self) -> bool:
        """Nothing to do: tell the followers to wait for the engine's wake-up rather than
        in a ring recv (which the backend serves by polling a core)."""
        if self.link is None:
            return False
        self.parked = True
        mx.async_eval(self.link.send(header(OP_PARK, 0, tag=self.kicks)))
        self.inflight.append(_InFlight(None, OP_PARK))
        return True

    def _drain_commands(self, block: bool) -> None:
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

    def _admit(self) -> None:
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
            seq = Sequence(req_id=c["id"], slot=self.free_slots.pop(), prompt=prompt, pos=keep, reused=keep,
                           source=source, max_tokens=int(c["max_tokens"]), params=SamplingParams(**p),
                           seed=int(c["seed"]), stop_ids=frozenset(c.get("stop_ids", ())),
                           logprobs=int(c.get("logprobs", 0)))
            self.seqs[seq.slot] = seq

    def _has_work(self) -> bool:
        self._retire_finished()
        self._admit()
        return any(self._next_op(s) is not None for s in self.seqs.values())

    def _retire_finished(self) -> None:
        """Free (or retain) finished sequences before admitting new ones: a client that
        sends its next turn as soon as it has the last token must find this one retained."""
        if self.waiting:
            for s in [s for s in self.seqs.values() if s.finished and not s.freed]:
                self._send_free(s)

    def _next_op(self, s: Sequence) -> str | None:
        if s.finished:
            return None if s.freed else "free"
        if not s.setup_sent:
            return "setup"
        if len(s.prompt) - s.pos > 1:
            return "chunk"
        if s.awaiting:
            return None
        return "step"

    def _inject_one(self) -> bool:
        self._retire_finished()
        self._admit()
        seqs = sorted(self.seqs.values(), key=lambda s: s.slot)
        n = len(seqs)
        for i in range(n):
            s = seqs[(self._rr + i) % n]
            op = self._next_op(s)
            if op is None or (op == "chunk" and any(f.large for f in self.inflight)):
                continue
            self._rr = (self._rr + i + 1) % max(n, 1)
            getattr(self, f"_send_{op}")(s)
            return True
        return False

    # -- what rank 0 sends ------------------------------------------------------------
    def _send_setup(self, s: Sequence) -> None:
        words = encode_params(s.params, s.seed, s.logprobs, s.prompt)
        self.runner.setup(s.slot, words, s.reused if s.reused else None, s.source)
        s.setup_sent = True
        if self.link is not None:
            head = header(OP_SETUP, s.slot, len(words), FLAG_REUSE if s.reused else 0, value=s.reused,
                          aux=s.source)
            mx.async_eval(self.link.send(head, mx.array(words)))
        self.inflight.append(_InFlight(s, OP_SETUP))

    def _send_chunk(self, s: Sequence) -> None:
        n = min(self.prefill_step, len(s.prompt) - s.pos - 1)
        tokens = s.prompt[s.pos:s.pos + n]
        s.pos += n
        self.stats["prefill_chunks"] = self.stats.get("prefill_chunks", 0) + 1
        self._forward(s, tokens, sample=False, large=n > 1)

    def _send_step(self, s: Sequence) -> None:
        if s.pos < len(s.prompt):
            tokens, s.pos = s.prompt[s.pos:], len(s.prompt)
        else:
            tokens = [s.last_token]
        s.awaiting += 1
        self._forward(s, tokens, sample=True, large=len(tokens) > 1)

    def _chain_next_step(self) -> None:
        """One stream alone: queue its next step now, fed by the token that is still being
        computed (single stage: the lazy sampled array, as mlx-lm's generate_step does; a
        ring: the posted recv of the reply), so that building rank 0's graph is off the
        critical path and no host round trip sits between two steps. In a ring only where
        ranks poll (with select() the recv must not be posted before data is there) and
        without top logprobs (their reply size varies), and not where lock-step runs take
        over steady decoding (they need the ring drained); never past max_tokens. If the
        token turns out to end the sequence, the chained step's result is dropped and FREE
        follows."""
        if len(self.inflight) != 1 or self.stopping or (self.link is not None and self.link.collective is not None):
            return
        f = self.inflight[0]
        s = f.seq
        if (s is None or not f.sample or f.chained or s.finished or s.awaiting != 1
                or s.generated + 2 > s.max_tokens):
            return
        if self.link is None:
            out = self.runner.forward(s.slot, f.local[0].reshape(1, 1), True)
            mx.async_eval([o for o in out if o is not None])
            nxt = _InFlight(s, OP_FORWARD, True, False, out)
        else:
            if self.link.wait_on or s.logprobs:
                return
            f.reply = self.link.recv_header_lazy()
            h = self.runner.forward(s.slot, f.reply[5:6].reshape(1, 1), False)
            head = header(OP_FORWARD, s.slot, 1, FLAG_SAMPLE, dtype_code(h.dtype))
            mx.async_eval(self.link.send(head, h))
            nxt = _InFlight(s, OP_FORWARD, True, False)
        f.chained = True
        s.awaiting += 1
        self.stats["chained"] = self.stats.get("chained", 0) + 1
        self.inflight.append(nxt)

    def _forward(self, s: Sequence, tokens: list[int], sample: bool, large: bool) -> None:
        x = mx.array(tokens, dtype=mx.int32)[None]
        if self.link is None:
            out = self.runner.forward(s.slot, x, sample)
            mx.async_eval([o for o in out if o is not None])
            self.inflight.append(_InFlight(s, OP_FORWARD, sample, large, out))
            return
        h = self.runner.forward(s.slot, x, False)
        head = header(OP_FORWARD, s.slot, len(tokens), FLAG_SAMPLE if sample else 0, dtype_code(h.dtype))
        mx.async_eval(self.link.send(head, h))
        self.inflight.append(_InFlight(s, OP_FORWARD, sample, large))

    def _send_free(self, s: Sequence) -> None:
        s.freed = True
        del self.seqs[s.slot]
        self.stats["kv_bytes"] = self._kv_bytes()  # this rank's caches, for the console
        self.emit({"t": "end", "id": s.req_id, "stats": dict(self.stats)})  # counters for /metrics
        # the caches hold the prompt and every generated token but the last (never fed);
        # anything past that (a chained or lock-step step after the end) is trimmed on reuse
        held = s.prompt[:s.pos] + s.tokens[:-1]
        if (self.prompt_cache and s.setup_sent and held and not self.stopping
                and all(c.is_trimmable() for c in self.runner.caches[s.slot])):
            self.retained.add(s.slot, held)
            self._evict_retained(self.prompt_cache)
            return
        self._free_slot(s.slot)

    def _kv_bytes(self) -> int:
        try:
            return int(sum(c.nbytes for caches in self.runner.caches.values() for c in caches))
        except Exception:  # a cache type without nbytes: unknown
            return 0

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
        self.inflight.append(_InFlight(None, OP_FREE))
        self.free_slots.append(slot)
        mx.clear_cache()

    def expect_ack(self) -> None:
        """A message was sent outside the scheduler (lock-step's TRIM): its ACK comes back in turn."""
        self.inflight.append(_InFlight(None, OP_TRIM))

    def _shutdown_ring(self) -> None:
        if self.link is not None:
            mx.eval(self.link.send(header(OP_STOP, 0)))
            self.link.recv_header()

    # -- what comes back --------------------------------------------------------------
    def _receive_one(self) -> None:
        f = self.inflight.popleft()
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
            t_wait = time.perf_counter()
            if f.reply is not None:
                mx.eval(f.reply)
                h = np.array(f.reply)
            else:
                h = self.link.recv_header()
            self.stats["wait_s"] = self.stats.get("wait_s", 0.0) + time.perf_counter() - t_wait
            if int(h[0]) not in (OP_TOKEN, OP_ACK):
                raise RuntimeError(f"rank 0 got unexpected op {int(h[0])} from the last stage")
            if int(h[0]) != OP_TOKEN:
                return
            token, logprob = read_token(h)
            top = None
            if int(h[2]) > 0:
                words = self.link.recv_payload((2 * int(h[2]),), mx.int32)
                mx.eval(words)
                top = decode_top(np.array(words))
            self.stats["bytes_sent"] = self.link.bytes_sent
        s = f.seq
        self.stats["steps"] += 1
        if s is None or s.finished:
            return
        s.awaiting -= 1
        self._accept(s, token, logprob, top)

    def _accept(self, s: Sequence, token: int, logprob: float, top: list | None) -> None:
        """A token of `s` came back: hand it out; finish the sequence at its end."""
        s.generated += 1
        s.tokens.append(token)
        s.last_token = token
        self.stats["tokens"] += 1
        ev = {"t": "token", "id": s.req_id, "tok": token, "lp": logprob}
        if top is not None:
            ev["top"] = [[i, v] for i, v in top]
        self.emit(ev)
        if s.generated >= s.max_tokens or token in s.stop_ids:
            s.finished = True


