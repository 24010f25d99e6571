"""The Engine (see api.py): tokenizer, requests, text, stop strings; the pipeline behind it.

`open_engine(path, ranks=1)` runs the single stage in a thread of this process;
`ranks>1` starts one worker process per rank (see group.py) and drives rank 0 over the
control connection. Either way the engine sees the same events: a token per step and an
"end" when rank 0 has freed the sequence.

The engine keeps, per request, the prompt and every token generated so far
(`Engine.in_flight_state()`): enough to re-prefill the requests on a new group after a node
is lost (the cluster's re-placement hook).
"""

from __future__ import annotations

import itertools
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from mlxdist.errors import UserError
from mlxdist.runtime.api import GenerationRequest, SamplingParams, TokenEvent


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


class RequestHandleImpl:
    def __init__(self, engine: "Engine", r: _Request):
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


class Engine:
    def __init__(self, model_path: Path, tokenizer: Any, backend: Any, context_length: int,
                 max_concurrent: int, model_name: str | None = None):
        self.model_path = model_path
        self.model_name = model_name or model_path.name
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_concurrent = max_concurrent
        self._backend = backend
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._requests: dict[int, _Request] = {}
        self._closed = False
        self._failed: str | None = None
        self._stats = {"requests": 0, "tokens": 0, "started": time.monotonic()}
        self._eos = set(tokenizer.eos_token_ids or ())
        backend.start(self._on_event, self._on_failure)

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
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(62)
        r = _Request(request, next(self._ids), seed)
        r.detok = self.tokenizer.detokenizer
        r.detok.reset()
        with self._lock:
            self._requests[r.req_id] = r
            self._stats["requests"] += 1
        if request.max_tokens <= 0:
            self._finish(r, TokenEvent(None, "", finish_reason="length"))
            return RequestHandleImpl(self, r)
        s = request.sampling
        self._backend.send({
            "t": "add", "id": r.req_id, "prompt": list(request.prompt_tokens),
            "max_tokens": request.max_tokens, "seed": seed, "logprobs": request.logprobs,
            "stop_ids": sorted(self._eos | set(request.stop_token_ids)),
            "params": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                       "min_p": s.min_p, "repetition_penalty": s.repetition_penalty,
                       "repetition_context": s.repetition_context, "seed": None},
        })
        return RequestHandleImpl(self, r)

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
        self._closed = True
        for r in list(self._requests.values()):
            if not r.done:
                self._finish(r, TokenEvent(None, "", finish_reason="cancelled"))
        self._backend.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- events from the pipeline -------------------------------------------------------
    def _cancel(self, req_id: int) -> None:
        r = self._requests.get(req_id)
        if r is not None and not r.done:
            self._finish(r, TokenEvent(None, self._flush(r), finish_reason="cancelled"))
            self._backend.send({"t": "cancel", "id": req_id})

    def _on_event(self, ev: dict) -> None:
        r = self._requests.get(ev.get("id", -1))
        if r is None:
            return
        if ev["t"] == "end":
            with self._lock:
                self._requests.pop(r.req_id, None)
            if not r.done:  # rank 0 stopped it without a final token (should not happen)
                self._finish(r, TokenEvent(None, self._flush(r), finish_reason="length"))
            return
        if ev["t"] != "token" or r.done:
            return
        token, logprob = int(ev["tok"]), float(ev["lp"])
        r.generated.append(token)
        self._stats["tokens"] += 1
        req = r.req
        if token in self._eos or token in req.stop_token_ids:
            self._finish(r, TokenEvent(token, self._flush(r), logprob, "stop"))
            self._backend.send({"t": "cancel", "id": r.req_id})
            return
        r.detok.add_token(token)
        r.text += r.detok.last_segment
        hit = _find_stop(r.text, req.stop_strings, r.sent)
        if hit is not None:
            r.text = r.text[:hit]
            self._finish(r, TokenEvent(token, self._take(r, len(r.text)), logprob, "stop"))
            self._backend.send({"t": "cancel", "id": r.req_id})
            return
        if len(r.generated) >= req.max_tokens:
            self._finish(r, TokenEvent(token, self._flush(r), logprob, "length"))
            return
        safe = len(r.text) - _held_back(r.text, req.stop_strings, r.sent)
        r.events.put(TokenEvent(token, self._take(r, safe), logprob))

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

    def _on_failure(self, message: str) -> None:
        self._failed = message
        for r in list(self._requests.values()):
            if not r.done:
                self._finish(r, TokenEvent(None, "", finish_reason="error", error=message))

    @property
    def failure(self) -> str | None:
        return self._failed


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


def open_engine(model_path: str | os.PathLike, ranks: int = 1, split: Sequence[int] | None = None,
                **opts: Any) -> Engine:
    """Load a model (an mlx-lm directory or a shard directory) over `ranks` stages.

    opts: max_concurrent (slots, default 8), prefill_step (2048, as mlx-lm), backend
    ("ring"), launcher (a Launcher; default: local processes), heartbeat_timeout_s (5),
    startup_timeout_s (300), model_name, in_process (ranks=1 only; default True)."""
    from mlxdist.runtime.source import resolve_source

    source = resolve_source(Path(model_path), ranks, split)
    tokenizer = source.load_tokenizer()
    max_concurrent = int(opts.get("max_concurrent", 8))
    prefill_step = int(opts.get("prefill_step", 2048))
    if ranks == 1 and opts.get("in_process", True) and opts.get("launcher") is None:
        from mlxdist.runtime.local import InProcessBackend

        backend: Any = InProcessBackend(source, max_concurrent, prefill_step)
    else:
        from mlxdist.runtime.group import WorkerGroupBackend

        backend = WorkerGroupBackend(source, max_concurrent=max_concurrent, prefill_step=prefill_step,
                                     backend=opts.get("backend", "ring"), launcher=opts.get("launcher"),
                                     heartbeat_timeout_s=float(opts.get("heartbeat_timeout_s", 5.0)),
                                     startup_timeout_s=float(opts.get("startup_timeout_s", 300.0)))
    return Engine(source.root, tokenizer, backend, source.context_length, max_concurrent,
                  opts.get("model_name"))


__all__ = ["Engine", "open_engine", "RequestHandleImpl", "UserError"]
