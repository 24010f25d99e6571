"""The stage loop: what every rank does with each message, and the scheduler on rank 0.

Rank 0 owns the sequences. For each one it sends, in order, SETUP (sampling parameters:
every stage makes a cache for the slot, the last one a sampler), the prompt minus its last
token in chunks of `prefill_step` (as mlx-lm's generate_step does, so the floating-point
results match), then one FORWARD per token with FLAG_SAMPLE, and finally FREE. Each message
goes round the ring once: rank 0 embeds and runs its layers, each stage runs its layers and
passes the hidden state on, the last stage runs the head, samples, and sends only a header
with the token id back to rank 0. Every message rank 0 sends comes back exactly once (a
token or an ACK), in order, so rank 0 knows what each reply belongs to.

Several sequences are in the ring at once, one message each, so with N stages and N
requests every stage has work: pipelined decoding. Prompt chunks of one sequence need not
wait for each other (stage order keeps the cache order), but a decode step waits for the
token before it. At most one multi-token message is in the ring at a time: large sends
block until the neighbour receives, and a ring of blocked senders would deadlock.
"""

from __future__ import annotations

import queue
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from mlxdist.runtime.api import SamplingParams
from mlxdist.runtime.sampling import SlotSampler, encode_params
from mlxdist.runtime.stage import Stage
from mlxdist.runtime.wire import (
    DTYPES, FLAG_SAMPLE, OP_ACK, OP_FORWARD, OP_FREE, OP_SETUP, OP_STOP, OP_TOKEN, RingLink,
    dtype_code, header, read_token, token_header,
)


class StageRunner:
    """One rank's layers plus the caches (and, on the last stage, the samplers) of the
    slots it has been told about. Caches live only here; nothing else holds them."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.caches: dict[int, list[Any]] = {}
        self.samplers: dict[int, SlotSampler] = {}

    def setup(self, slot: int, words: np.ndarray) -> None:
        self.caches[slot] = self.stage.make_cache()
        if self.stage.spec.is_last:
            self.samplers[slot] = SlotSampler.decode(words)

    def free(self, slot: int) -> None:
        self.caches.pop(slot, None)
        self.samplers.pop(slot, None)

    def forward(self, slot: int, x: mx.array, sample: bool) -> Any:
        cache = self.caches[slot]
        if self.stage.spec.is_last and sample:
            logits = self.stage.forward(x, cache, logits=True)[:, -1, :]
            return self.samplers[slot].sample(logits)
        h = self.stage.forward(x, cache)
        if self.stage.spec.is_last:  # prompt chunk: only the cache matters (as in mlx-lm)
            return [c.state for c in cache]
        return h


def follower_loop(runner: StageRunner, link: RingLink, hidden_size: int) -> None:
    """Ranks 1..N-1: receive, compute, pass on, until STOP."""
    last = runner.stage.spec.is_last
    while True:
        h = link.recv_header()
        op, slot, n, flags, dt, tag = (int(v) for v in (h[0], h[1], h[2], h[3], h[4], h[7]))
        if op == OP_SETUP:
            words = link.recv_payload((n,), mx.int32)
            mx.eval(words)
            runner.setup(slot, np.array(words))
            sends = link.send(header(OP_ACK, slot, tag=tag)) if last else link.send(mx.array(h), words)
            mx.async_eval(sends)
        elif op == OP_FORWARD:
            x = link.recv_payload((1, n, hidden_size), DTYPES[dt])
            out = runner.forward(slot, x, bool(flags & FLAG_SAMPLE))
            if not last:
                mx.async_eval(link.send(mx.array(h), out))
            elif flags & FLAG_SAMPLE:
                token, logprob = out
                mx.async_eval(link.send(token_header(slot, token, logprob, tag)))
            else:
                mx.async_eval(link.send(header(OP_ACK, slot, tag=tag)), out)
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
    pos: int = 0  # prompt tokens sent
    setup_sent: bool = False
    generated: int = 0
    last_token: int | None = None
    awaiting: bool = False  # a sampling step is in the ring
    finished: bool = False
    freed: bool = False


@dataclass
class _InFlight:
    seq: Sequence | None
    op: int
    sample: bool = False
    large: bool = False
    local: Any = None  # single-stage: the lazy result


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
    commands: "queue.Queue[dict]" = field(default_factory=queue.Queue)
    stats: dict[str, float] = field(default_factory=lambda: {"tokens": 0, "steps": 0, "bytes_sent": 0})

    def __post_init__(self) -> None:
        self.num_stages = 1 if self.link is None else self.link.size
        self.max_inflight = self.num_stages + 1
        self.seqs: dict[int, Sequence] = {}
        self.free_slots = list(range(self.max_slots - 1, -1, -1))
        self.waiting: deque[dict] = deque()
        self.inflight: deque[_InFlight] = deque()
        self.stopping = False
        self._rr = 0

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        while True:
            self._drain_commands(block=not self.inflight and not self._has_work())
            if self.stopping and not self.inflight and not self.seqs:
                self._shutdown_ring()
                return
            while len(self.inflight) < self.max_inflight and self._inject_one():
                pass
            if self.inflight:
                self._receive_one()

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
        if t == "add":
            self.waiting.append(cmd)
        elif t == "cancel":
            self.waiting = deque(c for c in self.waiting if c["id"] != cmd["id"])
            for s in self.seqs.values():
                if s.req_id == cmd["id"]:
                    s.finished = True
        elif t == "stop":
            self.stopping = True
            self.waiting.clear()
            for s in self.seqs.values():
                s.finished = True

    def _admit(self) -> None:
        while self.waiting and self.free_slots and not self.stopping:
            c = self.waiting.popleft()
            p = c.get("params") or {}
            seq = Sequence(req_id=c["id"], slot=self.free_slots.pop(), prompt=list(c["prompt"]),
                           max_tokens=int(c["max_tokens"]), params=SamplingParams(**p),
                           seed=int(c["seed"]), stop_ids=frozenset(c.get("stop_ids", ())),
                           logprobs=int(c.get("logprobs", 0)))
            self.seqs[seq.slot] = seq

    def _has_work(self) -> bool:
        self._admit()
        return any(self._next_op(s) is not None for s in self.seqs.values())

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
        self.runner.setup(s.slot, words)
        s.setup_sent = True
        if self.link is not None:
            mx.async_eval(self.link.send(header(OP_SETUP, s.slot, len(words)), mx.array(words)))
        self.inflight.append(_InFlight(s, OP_SETUP))

    def _send_chunk(self, s: Sequence) -> None:
        n = min(self.prefill_step, len(s.prompt) - s.pos - 1)
        tokens = s.prompt[s.pos:s.pos + n]
        s.pos += n
        self._forward(s, tokens, sample=False, large=n > 1)

    def _send_step(self, s: Sequence) -> None:
        if s.pos < len(s.prompt):
            tokens, s.pos = s.prompt[s.pos:], len(s.prompt)
        else:
            tokens = [s.last_token]
        s.awaiting = True
        self._forward(s, tokens, sample=True, large=len(tokens) > 1)

    def _forward(self, s: Sequence, tokens: list[int], sample: bool, large: bool) -> None:
        x = mx.array(tokens, dtype=mx.int32)[None]
        if self.link is None:
            out = self.runner.forward(s.slot, x, sample)
            mx.async_eval(out)
            self.inflight.append(_InFlight(s, OP_FORWARD, sample, large, out))
            return
        h = self.runner.forward(s.slot, x, False)
        head = header(OP_FORWARD, s.slot, len(tokens), FLAG_SAMPLE if sample else 0, dtype_code(h.dtype))
        mx.async_eval(self.link.send(head, h))
        self.inflight.append(_InFlight(s, OP_FORWARD, sample, large))

    def _send_free(self, s: Sequence) -> None:
        s.freed = True
        self.runner.free(s.slot)
        if self.link is not None:
            mx.async_eval(self.link.send(header(OP_FREE, s.slot)))
        self.inflight.append(_InFlight(None, OP_FREE))
        del self.seqs[s.slot]
        self.free_slots.append(s.slot)
        self.emit({"t": "end", "id": s.req_id})
        mx.clear_cache()

    def _shutdown_ring(self) -> None:
        if self.link is not None:
            mx.eval(self.link.send(header(OP_STOP, 0)))
            self.link.recv_header()

    # -- what comes back --------------------------------------------------------------
    def _receive_one(self) -> None:
        f = self.inflight.popleft()
        if self.link is None:
            if not f.sample:
                return
            token_arr, lp_arr = f.local
            token, logprob = int(token_arr.item()), float(lp_arr.item())
        else:
            h = self.link.recv_header()
            if int(h[0]) not in (OP_TOKEN, OP_ACK):
                raise RuntimeError(f"rank 0 got unexpected op {int(h[0])} from the last stage")
            if int(h[0]) != OP_TOKEN:
                return
            token, logprob = read_token(h)
            self.stats["bytes_sent"] = self.link.bytes_sent
        s = f.seq
        self.stats["steps"] += 1
        if s is None or s.finished:
            return
        s.awaiting = False
        s.generated += 1
        s.last_token = token
        self.stats["tokens"] += 1
        self.emit({"t": "token", "id": s.req_id, "tok": token, "lp": logprob})
        if s.generated >= s.max_tokens or token in s.stop_ids:
            s.finished = True


def run_coordinator_thread(coord: Coordinator, on_crash: Callable[[BaseException], None]):
    import threading

    def body() -> None:
        try:
            coord.run()
        except BaseException as e:  # reported to every request; the thread then ends
            on_crash(e)

    t = threading.Thread(target=body, name="mlxdist-coordinator", daemon=True)
    t.start()
    return t

