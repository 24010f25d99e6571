"""`GroupEngine`, the runtime's Engine (the interface in api.py) over one MLX group:
tokenizer, requests, text, stop strings; the pipeline behind it.

`open_engine(path, config, ranks=1)` runs the single stage in a thread of this process;
`ranks>1` starts one worker process per rank (see group.py) and drives rank 0 over the
control connection. Either way the engine sees the same events: a token per step and an
"end" when rank 0 has freed the sequence.

The engine keeps, per request, the prompt and every token generated so far
(`GroupEngine.in_flight_state()`): enough to re-prefill the requests on a new group after a node
is lost (the cluster's re-placement hook).
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from mlxdist.errors import UserError, plural
from mlxdist.runtime.api import GenerationRequest, Health, Layout, NodeInfo, SamplingParams, StageInfo, TokenEvent
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.messages import Add, Backend, Cancel, Command, End, Event, Sampling, Think
from mlxdist.runtime.thinking import resume


SEED_RANGE = 1 << 62
RESTART_WINDOW_S = 600.0  # more than config.restart_limit restarts within it: a crash loop
MAX_REPLAYS = 2  # failures a request may be in flight through; then it ends with the error


@dataclass
class _Request:
    req: GenerationRequest
    req_id: int
    seed: int
    events: "queue.Queue[TokenEvent]" = field(default_factory=queue.Queue)
    generated: list[int] = field(default_factory=list)
    detok: Any = None
    text: str = ""  # all decoded text so far
    sent: int = 0  # characters of `text` already handed out
    done: bool = False
    started: float = field(default_factory=time.monotonic)
    replays: int = 0  # group failures this request was in flight through


class RequestHandleImpl:
    def __init__(self, engine: "GroupEngine", r: _Request):
        self.request_id = r.req_id
        self._engine, self._r = engine, r

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            ev = self._r.events.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def cancel(self) -> None:
        self._engine._cancel(self._r.req_id)

    def tokens(self) -> list[int]:
        """All generated token ids (convenience for tests and tools)."""
        return [e.token for e in self if e.token is not None]


class GroupEngine:
    def __init__(self, model_path: Path, tokenizer: Any, backend: Backend, context_length: int,
                 config: EngineConfig, *, launcher: Any = None,
                 on_failure: Callable[["GroupEngine", str], None] | None = None):
        self.model_path = model_path
        self.config = config
        self.model_name = config.model_name or model_path.name
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_concurrent = config.max_concurrent
        self._launcher = launcher  # None: local processes (or this one)
        self._failure_hook = on_failure
        self._lock = threading.Lock()
        self._events_lock = threading.RLock()  # one request's text is touched by one thread at a time
        self._ids = itertools.count(1)
        self._requests: dict[int, _Request] = {}
        self._closed = False
        self._failed: str | None = None
        self._stats = {"requests": 0, "tokens": 0, "started": time.monotonic()}
        self._eos = set(tokenizer.eos_token_ids or ())
        self._healing: str | None = None  # why the group is being rebuilt, while it is
        self._replacing: str | None = None  # the same while an on_failure hook runs
        self._restarts: list[float] = []  # when the group was restarted (crash-loop window)
        self._closing = threading.Event()  # set by close(): a restart's back-off ends
        self.events_log: list[dict] = []  # restarts and give-ups, newest last (GET /v1/cluster)
        self.source: Any = None  # the ModelSource the ranks run (open_engine sets it)
        self._attach(backend)

    def _attach(self, backend: Backend) -> None:
        """Events from a backend count only while it is the current one."""
        self._backend = backend
        backend.start(lambda ev: self._on_event(ev) if self._backend is backend else None,
                      lambda msg: self._group_failed(msg) if self._backend is backend else None)

    # -- the interface ------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandleImpl:
        if self._failed:
            raise RuntimeError(self._failed)
        if self._closed:
            raise RuntimeError("engine is closed")
        if not request.prompt_tokens:
            raise ValueError("empty prompt")
        if len(request.prompt_tokens) + request.max_tokens > self.context_length:
            raise ValueError(f"prompt ({len(request.prompt_tokens)} tokens) + max_tokens "
                             f"({request.max_tokens}) exceeds the context length {self.context_length}")
        seed = request.sampling.seed
        # the stages take 62 bits of seed; any integer maps onto them (negative, 2**70, ...)
        seed = seed % SEED_RANGE if seed is not None else random.getrandbits(62)
        r = _Request(request, next(self._ids), seed)
        r.detok = self.tokenizer.detokenizer
        r.detok.reset()
        with self._events_lock:  # a restart re-sends what is registered: send here or there, once
            with self._lock:
                self._requests[r.req_id] = r
                self._stats["requests"] += 1
            if request.max_tokens <= 0:
                self._finish(r, TokenEvent(None, "", finish_reason="length"))
            elif self._healing is None:
                self._send_add(r, list(request.prompt_tokens), request.max_tokens)
        return RequestHandleImpl(self, r)

    def _send_add(self, r: _Request, prompt: list[int], max_tokens: int) -> None:
        s, request = r.req.sampling, r.req
        think = resume(request.thinking, r.generated)
        self._backend.send(Add(
            r.req_id, tuple(prompt), max_tokens, r.seed, request.logprobs,
            tuple(sorted(self._eos | set(request.stop_token_ids))),
            Sampling(s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty, s.repetition_context),
            None if think is None else Think(tuple(think.open), tuple(think.close), think.inside, think.budget)))

    def generate(self, prompt: str | list[int], max_tokens: int = 64, **sampling: Any) -> list[int]:
        """Convenience: one request, all its tokens."""
        tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        req = GenerationRequest(tuple(tokens), max_tokens, SamplingParams(**sampling))
        return self.submit(req).tokens()

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            out = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) else out)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return list(tok.encode(text))

    def stats(self) -> dict[str, float]:
        with self._lock:
            active = sum(1 for r in self._requests.values() if not r.done)
            out = {"requests_total": float(self._stats["requests"]), "requests_active": float(active),
                   "tokens_generated": float(self._stats["tokens"]),
                   "uptime_s": time.monotonic() - self._stats["started"]}
        out.update({k: float(v) for k, v in self._backend.stats().items()})
        return out

    def in_flight_state(self) -> list[dict]:
        """Prompt and generated tokens of every unfinished request (re-placement hook)."""
        with self._lock:
            return [{"id": r.req_id, "prompt": list(r.req.prompt_tokens), "generated": list(r.generated),
                     "request": r.req, "seed": r.seed} for r in self._requests.values() if not r.done]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # a restart in progress stops at its next step
        self._closing.set()
        with self._events_lock:
            for r in list(self._requests.values()):
                if not r.done:
                    self._finish(r, TokenEvent(None, "", finish_reason="cancelled"))
        self._backend.close()

    def __enter__(self) -> "GroupEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- events from the pipeline -------------------------------------------------------
    def _cancel(self, req_id: int) -> None:
        with self._events_lock:
            self._cancel_locked(req_id)

    def _cancel_locked(self, req_id: int) -> None:
        r = self._requests.get(req_id)
        if r is not None and not r.done:
            self._finish(r, TokenEvent(None, self._flush(r), finish_reason="cancelled"))
            self._backend.send(Cancel(req_id))

    def _on_event(self, ev: Event) -> None:
        with self._events_lock:
            try:
                self._on_event_locked(ev)
            except Exception as e:  # noqa: BLE001 - e.g. the detokenizer: this request ends, not the engine
                r = self._requests.get(ev.id)
                if r is not None and not r.done:
                    self._finish(r, TokenEvent(None, "", finish_reason="error",
                                               error=f"generation failed: {type(e).__name__}: {e}"))
                    self._backend.send(Cancel(r.req_id))

    def _on_event_locked(self, ev: Event) -> None:
        r = self._requests.get(ev.id)
        if r is None:
            return
        if isinstance(ev, End):
            with self._lock:
                self._requests.pop(r.req_id, None)
            if not r.done:  # rank 0 stopped it without a final token (should not happen)
                self._finish(r, TokenEvent(None, self._flush(r), finish_reason="length"))
            return
        if r.done:
            return
        token, logprob = ev.tok, ev.lp
        if math.isnan(logprob):  # the model gave NaN logits, or the sampler refused this request
            self._finish(r, TokenEvent(None, self._flush(r), finish_reason="error",
                                       error="generation failed: the model produced NaN, or the sampler "
                                             "refused this request's parameters (see the last rank's log)"))
            self._backend.send(Cancel(r.req_id))
            return
        top, th = ev.top, ev.thinking
        r.generated.append(token)
        self._stats["tokens"] += 1
        req = r.req
        if token in self._eos or token in req.stop_token_ids:
            self._finish(r, TokenEvent(token, self._flush(r), logprob, "stop", top_logprobs=top, thinking=th))
            self._backend.send(Cancel(r.req_id))
            return
        r.detok.add_token(token)
        r.text += r.detok.last_segment
        hit = _find_stop(r.text, req.stop_strings, r.sent)
        if hit is not None:
            r.text = r.text[:hit]
            self._finish(r, TokenEvent(token, self._take(r, len(r.text)), logprob, "stop", top_logprobs=top,
                                      thinking=th))
            self._backend.send(Cancel(r.req_id))
            return
        if len(r.generated) >= req.max_tokens:
            self._finish(r, TokenEvent(token, self._flush(r), logprob, "length", top_logprobs=top, thinking=th))
            return
        safe = len(r.text) - _held_back(r.text, req.stop_strings, r.sent)
        r.events.put(TokenEvent(token, self._take(r, safe), logprob, top_logprobs=top, thinking=th))

    def _flush(self, r: _Request) -> str:
        r.detok.finalize()
        r.text += r.detok.last_segment
        hit = _find_stop(r.text, r.req.stop_strings, r.sent)
        if hit is not None:
            r.text = r.text[:hit]
        return self._take(r, len(r.text))

    @staticmethod
    def _take(r: _Request, upto: int) -> str:
        piece = r.text[r.sent:upto] if upto > r.sent else ""
        r.sent = max(r.sent, upto)
        return piece

    def _finish(self, r: _Request, ev: TokenEvent) -> None:
        r.done = True
        r.events.put(ev)

    def health(self) -> Health:
        """ok; degraded while the group is being rebuilt (with why); down once it failed
        for good or was closed."""
        if self._closed:
            return Health("down", "the engine is closed")
        if self._failed:
            return Health("down", self._failed)
        if self._healing is not None:
            return Health("degraded", f"restarting the ranks after: {self._healing}")
        if self._replacing is not None:
            return Health("degraded", f"re-placing after: {self._replacing}")
        return Health("ok")

    def _group_failed(self, message: str) -> None:
        hook = self._failure_hook
        restart = self.config.restart if self.config.restart is not None else self._launcher is None
        if hook is not None:
            threading.Thread(target=self._run_hook, args=(hook, message), daemon=True).start()
        elif restart:
            with self._events_lock:
                if self._healing is not None or self._closed:
                    return
                self._healing = message
            threading.Thread(target=self._heal, args=(message,), daemon=True, name="mlxdist-heal").start()
        else:
            self.fail(message)

    def _run_hook(self, hook: Any, message: str) -> None:
        """The caller's failure hook (e.g. the cluster re-placing): health() says degraded
        while it runs."""
        self._replacing = message
        try:
            hook(self, message)
        finally:
            self._replacing = None

    def _heal(self, message: str) -> None:
        """Restart the group on this machine (same ranks and split) and carry the requests
        over (regroup). Failures close together back off (1, 2, 4 ... s); more than
        config.restart_limit within RESTART_WINDOW_S is a crash loop: give up and say so."""
        reason = message
        self._drop_replayed(message)
        while not self._closed:
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S] + [now]
            n = len(self._restarts)
            if n > self.config.restart_limit:
                why = (f"the ranks failed {n} times within {RESTART_WINDOW_S / 60:.0f} minutes "
                       f"(a crash loop); not restarting again. Last failure: {reason}")
                self._log_event("gave_up", why)
                self._healing = None
                self.fail(why)
                return
            delay = 0.0 if n == 1 else min(30.0, 2.0 ** (n - 2))
            self._log_event("restarting", reason, delay_s=delay)
            print(f"mlxdist: {reason}; restarting the ranks" + (f" in {delay:.0f} s" if delay else ""),
                  file=sys.stderr, flush=True)
            if delay and self._closing.wait(delay):
                return
            t0 = time.monotonic()
            try:
                self.regroup()
            except Exception as e:  # noqa: BLE001 - try again, backing off
                reason = f"restart failed: {type(e).__name__}: {e}"
                continue
            self._log_event("restarted", message, seconds=round(time.monotonic() - t0, 2))
            print(f"mlxdist: ranks restarted in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
            return

    def _drop_replayed(self, message: str) -> None:
        """A request in flight through MAX_REPLAYS failures may be what kills the ranks:
        end it with the error instead of feeding it to the next group too."""
        with self._events_lock:
            for r in list(self._requests.values()):
                if r.done:
                    continue
                r.replays += 1
                if r.replays > MAX_REPLAYS:
                    self._finish(r, TokenEvent(None, self._flush(r), finish_reason="error",
                                               error=f"the ranks failed {r.replays} times while this request "
                                                     f"ran; giving it up ({message})"))

    def events(self) -> list[dict]:
        """Restarts, give-ups and healed requests, newest last (at most 50)."""
        return list(self.events_log)

    def layout(self) -> Layout:
        """Where each rank runs and what it holds (GET /v1/cluster)."""
        source = self.source
        if source is None:
            return Layout("process", 0, (), ())
        backend = self._backend
        hosts = list(getattr(backend, "hosts", None) or ["127.0.0.1"] * len(source.stages))
        names = [_host_name(h) for h in hosts]
        total = int(source.config.get("n_routed_experts") or source.config.get("num_experts") or 0)
        stages = []
        for p in source.stages:
            experts = None
            if source.expert_parallel:
                from mlxdist.runtime.expert_parallel import split_experts

                owned = source.experts[p.rank] if source.experts else split_experts(total, len(source.stages))[p.rank]
                experts = tuple(int(e) for e in owned)
            elif source.mixed and source.experts[p.rank]:  # a member of the expert-parallel stage
                experts = tuple(int(e) for e in source.experts[p.rank])
            stages.append(StageInfo(p.rank, names[p.rank], p.start, p.end, _stage_weight_bytes(source, p), experts,
                                    total if experts is not None else 0))
        nodes = tuple(dict.fromkeys((n, h) for n, h in zip(names, hosts)))
        mode = "process" if len(source.stages) == 1 and not hasattr(backend, "launcher") else (
            "local" if self._launcher is None else "nodes")
        return Layout(mode, int(source.config.get("num_hidden_layers") or 0), tuple(stages),
                      tuple(NodeInfo(n, h) for n, h in nodes))

    def _log_event(self, kind: str, message: str, **extra: Any) -> None:
        self.events_log = (self.events_log + [{"t": time.time(), "event": kind, "message": message, **extra}])[-50:]

    def regroup(self, model_path: str | os.PathLike | None = None, ranks: int | None = None,
                split: Sequence[int] | None = None, launcher: Any = None,
                config: EngineConfig | None = None) -> None:
        """Re-placement hook: stop the current group, start a new one (other ranks, split,
        launcher, or config: e.g. each rank's experts), and carry every unfinished request over by
        re-prefilling its prompt plus the tokens generated so far. Its client sees a pause.
        Greedy requests continue with exactly the tokens an uninterrupted run gives."""
        from mlxdist.runtime.source import resolve_source

        old = self._backend
        with self._events_lock:  # from here on the old group's events (its "end"s) count for nothing
            self._backend = _Detached(old.stats(), getattr(old, "hosts", [None]))
        old.close()
        if launcher is not None:
            self._launcher = launcher
        if config is not None:
            self.config = config
        n = ranks or len(getattr(old, "hosts", [None]))
        experts = self.config.experts
        source = resolve_source(Path(model_path or self.model_path), n, split,
                                expert_parallel=self.config.expert_parallel,
                                experts=experts if experts and n == len(experts) else None,
                                stages=self.config.stages)
        backend = make_backend(source, n, self.config, self._launcher)
        with self._events_lock:
            if self._closed:  # closed while the new group started: it goes too
                backend.close()
                return
            self._failed = None
            self._healing = None
            self.source = source
            self._attach(backend)
            healed = 0
            for r in list(self._requests.values()):
                if not r.done:
                    healed += 1
                    self._send_add(r, list(r.req.prompt_tokens) + r.generated,
                                   r.req.max_tokens - len(r.generated))
            if healed:
                self._log_event("requests_healed", f"{plural(healed, 'request')} carried over to the new group "
                                                   "(re-prefilled, continuing where they stopped)")

    def fail(self, message: str) -> None:
        """End every open request with `message`; later submits raise it."""
        self._on_failure(message)

    def _on_failure(self, message: str) -> None:
        with self._events_lock:
            self._failed = message
            for r in list(self._requests.values()):
                if not r.done:
                    self._finish(r, TokenEvent(None, "", finish_reason="error", error=message))

    @property
    def failure(self) -> str | None:
        return self._failed


def _host_name(host: str) -> str:
    """This machine's ranks are named after it; others by their address."""
    import socket

    if host in ("127.0.0.1", "localhost", "::1"):
        return socket.gethostname() or "localhost"
    return host


def _stage_weight_bytes(source: Any, plan: Any) -> int:
    """The bytes of a stage's weights: its shard files (every part it runs); for an
    unsharded model directory, the model's files in proportion to the stage's layers
    (expert-parallel: its share of the ranks)."""
    if plan.shard:
        dirs = plan.parts or (plan.model_dir,)
        return sum(f.stat().st_size for d in dirs for f in Path(d).glob("*.safetensors"))
    total = sum(f.stat().st_size for f in Path(source.root).glob("*.safetensors"))
    if source.expert_parallel:
        return total // max(1, len(source.stages))
    share = total * (plan.end - plan.start) // max(1, plan.num_layers)
    if source.mixed and source.experts[plan.rank]:  # its stage's share of the members
        return share // sum(1 for p in source.stages if (p.start, p.end) == (plan.start, plan.end))
    return share


class _Detached:
    """The backend while a group is being replaced: sends go nowhere (regroup re-sends
    every open request to the new group)."""

    def __init__(self, stats: dict[str, Any], hosts: list) -> None:
        self._stats, self.hosts = stats, hosts  # hosts: how many ranks the group had

    def send(self, cmd: Command) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return self._stats

    def close(self) -> None:
        pass


def _find_stop(text: str, stops: Sequence[str], sent: int) -> int | None:
    best = None
    for s in stops:
        if not s:
            continue
        i = text.find(s, max(0, sent - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _held_back(text: str, stops: Sequence[str], sent: int) -> int:
    """How many trailing characters could still be the start of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - sent), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def make_backend(source: Any, ranks: int, config: EngineConfig, launcher: Any = None) -> Backend:
    if ranks == 1 and config.in_process and launcher is None:
        from mlxdist.runtime.local import InProcessBackend

        return InProcessBackend(source, config)
    from mlxdist.runtime.group import WorkerGroupBackend

    if launcher is None and config.handoff == "nccl":  # local ranks, one GPU each
        from mlxdist.runtime.launcher import LocalLauncher, one_gpu_per_rank

        launcher = LocalLauncher(rank_env=one_gpu_per_rank(ranks, os.environ.get("CUDA_VISIBLE_DEVICES")))
    return WorkerGroupBackend(source, config, launcher)


def open_engine(model_path: str | os.PathLike, config: EngineConfig = EngineConfig(), *, ranks: int = 1,
                split: Sequence[int] | None = None, launcher: Any = None,
                on_failure: Callable[[GroupEngine, str], None] | None = None) -> GroupEngine:
    """Load a model (an mlx-lm directory or a shard directory) over `ranks` stages (`split`:
    layers per rank; default even), with the options in `config` (config.py).

    launcher: a Launcher (launcher.py) that starts the workers; default local processes.
    on_failure: callable(engine, message), called in its own thread when the group fails
    instead of ending the requests with the error, e.g. to `engine.regroup(...)` on the
    nodes left, or `engine.fail(message)`. Without either, a failed or hung group is
    restarted here and the requests in flight continue (config.restart, GroupEngine._heal)."""
    from mlxdist.runtime.source import resolve_source

    source = resolve_source(Path(model_path), ranks, split,
                            expert_parallel=config.expert_parallel, experts=config.experts or None,
                            stages=config.stages)
    tokenizer = source.load_tokenizer()
    backend = make_backend(source, ranks, config, launcher)
    engine = GroupEngine(source.root, tokenizer, backend, source.context_length, config,
                    launcher=launcher, on_failure=on_failure)
    engine.source = source
    return engine


__all__ = ["GroupEngine", "open_engine", "make_backend", "RequestHandleImpl", "UserError"]
