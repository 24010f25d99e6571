"""Test-time compute on POST /v1/chat/completions: spend more generation on one question
and answer with the best of it. Two extension fields (the openai client sends them in
`extra_body`):

  "consensus": {"n": 8, "extract": "last_number", "early_stop": true}
      self-consistency: n samples of the same prompt at once (the engine shares their
      prefill), majority vote over their extracted answers; with early_stop the samples
      still running are cancelled once the leader cannot be overtaken.
  "search": {"strategy": "best_of_n" | "beam" | "dvts", "n": 4, "beam_width": 4,
             "max_steps": 40, "extract": "last_number", "verifier": "judge" | "prm"}
      verifier-guided search (search.py), scored by `api.verifier` or the served model
      itself as its own judge (verifier.py).

The answer is a normal `chat.completion`: choices[0] is the chosen candidate, the other
candidates follow; `usage` counts the prompt once and every generated token of every
candidate; one extension object ("consensus" or "search") says how the choice was made.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, replace
from typing import Any, Union

from starlette.requests import Request
from starlette.responses import Response

from mlxdist.runtime.api import Engine, GenerationRequest, Thinking
from mlxdist.server import protocol, search, verifier
from mlxdist.server.answers import check_extract, decided, extract_answer, vote
from mlxdist.server.generation import (ClientGone, Generation, admit, chat_tokens, decode, engine_errors, run_waves,
                                      start_generation, watch_disconnect)
from mlxdist.server.protocol import ApiError, CompletionParams
from mlxdist.server.reasoning import ReasoningSplitter, prompt_opens_think, split_reasoning
from mlxdist.server.responses import ChoiceState, chat_message
from mlxdist.server.state import Api


@dataclass(frozen=True)
class ConsensusSpec:
    n: int = 8
    extract: str = "last_number"
    early_stop: bool = True


@dataclass(frozen=True)
class SearchSpec:
    strategy: str = "best_of_n"
    n: int = 4
    beam_width: int = 4
    max_steps: int = 40
    extract: str = "last_number"
    verifier: str = "judge"


TtcSpec = Union[ConsensusSpec, SearchSpec]
MAX_STEPS = 200


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param)


def _field(obj: dict, name: str, key: str, types: tuple[type, ...], default: Any, what: str) -> Any:
    value = obj.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise _bad(f"'{name}.{key}' must be {what}", f"{name}.{key}")
    return value


def _count(obj: dict, name: str, key: str, default: int, hi: int) -> int:
    value = _field(obj, name, key, (int,), default, "an integer")
    if not 1 <= value <= hi:
        raise _bad(f"'{name}.{key}' must be between 1 and {hi}, got {value}", f"{name}.{key}")
    return value


def parse_ttc(body: Any, max_n: int = protocol.MAX_N) -> TtcSpec | None:
    """The request's test-time compute, or None for a plain chat. `max_n` bounds n (and
    beam_width): the engine's max_concurrent, as for `n`. Bad input: ApiError 400."""
    if not isinstance(body, dict) or (body.get("consensus") is None and body.get("search") is None):
        return None
    if body.get("consensus") is not None and body.get("search") is not None:
        raise _bad("'consensus' and 'search' cannot be combined: send one of them", "consensus")
    name = "consensus" if body.get("consensus") is not None else "search"
    obj = body[name]
    if not isinstance(obj, dict):
        raise _bad(f"'{name}' must be an object", name)
    known = ("n", "extract", "early_stop") if name == "consensus" else tuple(SearchSpec.__dataclass_fields__)
    for key in obj:
        if key not in known:
            raise _bad(f"unknown field '{name}.{key}' (known: {', '.join(known)})", f"{name}.{key}")
    if body.get("stream") is True:
        raise _bad(f"'stream' cannot be combined with '{name}': the answer is chosen once every candidate is done",
                   "stream")
    if body.get("n") not in (None, 1):
        raise _bad(f"'n' cannot be combined with '{name}': set the number of candidates as '{name}.n'", "n")
    extract = _field(obj, name, "extract", (str,), "last_number", "a string")
    try:
        check_extract(extract)
    except ValueError as e:
        raise _bad(f"'{name}.extract': {e}", f"{name}.extract")
    if name == "consensus":
        return ConsensusSpec(_count(obj, name, "n", min(8, max_n), max_n), extract,
                             _field(obj, name, "early_stop", (bool,), True, "a boolean"))
    strategy = _field(obj, name, "strategy", (str,), "best_of_n", "a string")
    if strategy not in search.STRATEGIES:
        raise _bad(f"'search.strategy' must be one of {', '.join(search.STRATEGIES)}, got '{strategy}'",
                   "search.strategy")
    kind = _field(obj, name, "verifier", (str,), "judge", "a string")
    if kind not in verifier.KINDS:
        raise _bad(f"'search.verifier' must be one of {', '.join(verifier.KINDS)}, got '{kind}'", "search.verifier")
    if body.get("logprobs"):
        raise _bad("'logprobs' cannot be combined with 'search'", "logprobs")
    if strategy != "best_of_n" and body.get("stop"):
        raise _bad(f"'stop' cannot be combined with search strategy '{strategy}': it splits steps at blank lines",
                   "stop")
    return SearchSpec(strategy, _count(obj, name, "n", min(4, max_n), max_n),
                      _count(obj, name, "beam_width", min(4, max_n), max_n),
                      _count(obj, name, "max_steps", 40, MAX_STEPS), extract, kind)


async def run_ttc(api: Api, request: Request, params: CompletionParams, messages: list[dict],
                  spec: TtcSpec) -> Response:
    """Admit, run and answer one test-time-compute request. Its slots are released exactly
    once whatever ends it; the client leaving cancels every engine request (ClientGone)."""
    engine = api.engine
    if spec.n > engine.max_concurrent or isinstance(spec, SearchSpec) and spec.beam_width > engine.max_concurrent:
        raise _bad(f"at most {engine.max_concurrent} candidates at once on this server (n, beam_width)", "n")
    tokens = await chat_tokens(api.run, engine, messages)
    if not tokens or len(tokens) >= engine.context_length:
        raise ApiError(400, f"the prompt is {len(tokens)} tokens; this model's context is {engine.context_length} "
                       "tokens", param="messages", code="context_length_exceeded")
    job = _Job(api, params, messages, tokens, spec)
    gone = asyncio.Event()
    work: list[asyncio.Future] = []

    def on_gone() -> None:
        gone.set()
        for w in work:
            w.cancel()

    watcher = asyncio.ensure_future(watch_disconnect(request.receive, on_gone))
    try:
        if not await admit(api.slots, job.limit, gone):
            raise ClientGone
        try:
            work.append(asyncio.ensure_future(job.run()))
            if gone.is_set():
                work[0].cancel()
            return await work[0]
        except asyncio.CancelledError:
            if gone.is_set():
                raise ClientGone
            raise
        finally:
            api.slots.release(job.limit)
    finally:
        watcher.cancel()


class _Job:
    """One request's candidates: runs them within the slots it was admitted with."""

    def __init__(self, api: Api, params: CompletionParams, messages: list[dict], tokens: list[int],
                 spec: TtcSpec) -> None:
        self.api, self.params, self.spec, self.tokens = api, params, spec, tokens
        self.engine: Engine = api.engine
        self.question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        self.tail = decode(self.engine, tokens[-32:])
        self.inside = prompt_opens_think(self.tail)
        self.eos = set(getattr(self.engine.tokenizer, "eos_token_ids", None) or ())
        need = spec.n if isinstance(spec, ConsensusSpec) or spec.strategy == "best_of_n" else spec.n * spec.beam_width
        self.limit = max(1, min(need, api.slots.slots))
        seed = params.sampling.seed
        self.seed = seed if seed is not None else random.getrandbits(62)
        self.t0, self.first = time.monotonic(), True
        self.completion = self.reasoning = 0
        self.verifier_usage = [0, 0]
        api.thinking(params.thinking_budget, self.inside)  # a budget it cannot enforce: 400 now

    async def run(self) -> Response:
        self.api.metrics.tokens(prompt=len(self.tokens))
        obj = await (self.consensus() if isinstance(self.spec, ConsensusSpec) else self.search())
        return Response(json.dumps(obj).encode(), 200, media_type="application/json")

    def request(self, tokens: list[int], seed: int | None, stop: tuple[str, ...], max_tokens: int | None,
                logprobs: int = 0, thinking: Thinking | None = None) -> GenerationRequest:
        room = self.engine.context_length - len(tokens)
        return GenerationRequest(tuple(tokens), max_tokens=min(max_tokens or room, room),
                                 sampling=replace(self.params.sampling, seed=seed), stop_strings=stop,
                                 logprobs=logprobs, thinking=thinking)

    def thinking(self, prefix: str = "", prefix_tokens: int = 0) -> Thinking | None:
        """What the engine follows of the thinking, as for plain chat. A search step goes on
        from a partial solution: inside the thinking while the prefix leaves it open, and
        then with what is left of the budget (the prefix's tokens counted as thought)."""
        inside = prompt_opens_think(self.tail + prefix) if prefix else self.inside
        budget = self.params.thinking_budget
        if budget is not None and prefix and inside:
            budget = max(0, budget - prefix_tokens)
        return self.api.thinking(budget, inside)

    async def start(self, requests: list[GenerationRequest]) -> Generation:
        with engine_errors():
            return await start_generation(self.engine, requests, asyncio.get_running_loop(), self.api.run)

    def counted(self, event: Any) -> None:
        if event.token is not None:
            if self.first:
                self.api.metrics.first_token(time.monotonic() - self.t0)
                self.first = False
            self.api.metrics.tokens(completion=1)
            self.completion += 1
            self.reasoning += bool(event.thinking)
        if event.finish_reason == "error":
            raise ApiError(500, f"generation failed: {event.error}", type="server_error")

    # -- self-consistency -------------------------------------------------------------------
    async def consensus(self) -> dict[str, Any]:
        spec, params = self.spec, self.params
        assert isinstance(spec, ConsensusSpec)
        base = params.sampling.seed
        top = max(1, params.top_logprobs) if params.logprobs else 0
        requests = [self.request(self.tokens, None if base is None else base + i, params.stop, params.max_tokens, top,
                                 self.thinking()) for i in range(spec.n)]
        states = [ChoiceState(i, len(self.tokens), ReasoningSplitter(self.inside)) for i in range(spec.n)]
        answers: list[str | None] = [None] * spec.n
        ended: dict[int, str] = {}  # candidate -> the engine's finish reason
        stopped = False
        gen = await self.start(requests)
        try:
            async for i, event in gen.events():
                self.counted(event)
                states[i].add(event, lambda t: decode(self.engine, [t]), params.logprobs, params.top_logprobs)
                if not event.finish_reason:
                    continue
                ended[i] = event.finish_reason
                if event.finish_reason != "cancelled":
                    answers[i] = extract_answer(states[i].content, spec.extract)
                done = [j for j, why in ended.items() if why != "cancelled"]
                counts = [v.count for v in vote([answers[j] for j in done]) if v.answer is not None]
                if spec.early_stop and not stopped and len(ended) < spec.n and decided(counts, spec.n - len(ended)):
                    stopped = True
                    gen.cancel()  # the rest end with "cancelled" events
        finally:
            gen.cancel()
        cancelled = [i for i, why in ended.items() if why == "cancelled"]
        kept = [i for i in range(spec.n) if i not in cancelled]
        table = vote([answers[i] for i in kept])
        chosen = kept[table[0].indices[0]] if table else 0
        order = [chosen] + [i for i in range(spec.n) if i != chosen]
        # what stopping early saved: at most each cut candidate's unused max_tokens; as an
        # estimate, what the finished ones that ran longer than it took beyond its length
        # (the cut ones are the long ones, so a plain mean of the finished would say 0)
        lengths = [states[i].completion_tokens for i in kept]
        saved = at_most = 0
        for i in cancelled:
            now = states[i].completion_tokens
            longer = [n for n in lengths if n > now]
            saved += round(sum(longer) / len(longer)) - now if longer else 0
            at_most += max(0, requests[i].max_tokens - now)
        choices = []
        for k, i in enumerate(order):
            states[i].index = k
            choices.append(chat_message(states[i], params.logprobs))
        extension = {
            "answer": table[0].answer if table else None,
            "votes": [{"answer": v.answer, "count": v.count} for v in table],
            "candidates": [{"index": k, "answer": answers[i], "finish_reason":
                            "cancelled" if i in cancelled else states[i].finish_reason,
                            "completion_tokens": states[i].completion_tokens} for k, i in enumerate(order)],
            "stopped_early": stopped, "cancelled": len(cancelled), "tokens_saved_estimate": saved,
            "tokens_saved_at_most": at_most}
        return self.completion_object(choices, "consensus", extension)

    # -- verifier-guided search -------------------------------------------------------------
    async def search(self) -> dict[str, Any]:
        spec, params = self.spec, self.params
        assert isinstance(spec, SearchSpec)
        cfg = search.SearchConfig(spec.strategy, spec.n, spec.beam_width, spec.max_steps, spec.extract,
                                  params.max_tokens or self.engine.context_length, self.seed, self.inside)
        result = await search.run_search(cfg, self.generate, self.score)
        order = [result.chosen] + [i for i in range(len(result.solutions)) if i != result.chosen]
        choices = []
        for k, i in enumerate(order):
            s = result.solutions[i]
            reasoning, content = split_reasoning(s.text, self.inside)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning:
                message["reasoning_content"] = message["reasoning"] = reasoning
            choices.append({"index": k, "message": message, "finish_reason": s.finish_reason, "logprobs": None})
        extension = {
            "strategy": result.strategy, "answer": result.answer,
            "scores": [result.solutions[i].score for i in order],
            "votes": [{"answer": v.answer, "count": v.count, "weight": v.weight} for v in result.votes],
            "best": order.index(result.best), "steps": result.steps, "generated_tokens": result.generated_tokens,
            "verifier": spec.verifier, "verifier_calls": result.verifier_calls,
            "verifier_usage": protocol.usage(*self.verifier_usage)}
        return self.completion_object(choices, "search", extension)

    async def generate(self, prefixes: list[str], n_each: int, stop: str | None, max_tokens: int | list[int],
                       seeds: list[int]) -> list[search.Completion]:
        """The search's generate: prompt + prefix as the assistant's text so far, run `limit`
        requests at a time; a prefix that fills the context ends as cut off by length."""
        prompts = await self.api.run(self.continue_prompts, prefixes)
        thinking = [self.thinking(p, len(t) - len(self.tokens)) for p, t in zip(prefixes, prompts)]
        stops = (stop,) if stop else self.params.stop
        out = [search.Completion("", 0, "length")] * (len(prefixes) * n_each)
        caps = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prefixes)
        todo = [(k, self.request(prompts[k // n_each], seeds[k], stops, caps[k // n_each], 0, thinking[k // n_each]))
                for k in range(len(out)) if len(prompts[k // n_each]) < self.engine.context_length]
        texts, tokens, last = [""] * len(todo), [0] * len(todo), [None] * len(todo)

        def on_event(j: int, event: Any) -> None:
            self.counted(event)
            texts[j] += event.text
            if event.token is not None:
                tokens[j], last[j] = tokens[j] + 1, event.token
            if event.finish_reason:
                hit = stop is not None and event.finish_reason == "stop" and last[j] not in (None, *self.eos)
                out[todo[j][0]] = search.Completion(texts[j], tokens[j], event.finish_reason, hit)

        await run_waves(self.start, [r for _, r in todo], self.limit, on_event)
        return out

    def continue_prompts(self, prefixes: list[str]) -> list[list[int]]:
        tok: Any = self.engine.tokenizer
        return [self.tokens + (list(tok.encode(p, add_special_tokens=False)) if p else []) for p in prefixes]

    async def score(self, solutions: list[str]) -> list[float]:
        judge = getattr(self.api, "verifier", None) or self.engine
        limit = self.limit if judge is self.engine else judge.max_concurrent
        try:
            got = await verifier.score_detailed(judge, asyncio.get_running_loop(), self.question, solutions,
                                                self.spec.verifier, limit=limit, run=self.api.run)  # type: ignore
        except (ValueError, RuntimeError) as e:
            raise ApiError(500, f"the verifier failed: {e}", type="server_error")
        self.verifier_usage[0] += got.prompt_tokens
        self.verifier_usage[1] += got.completion_tokens
        return list(got.scores)

    def completion_object(self, choices: list[dict], name: str, extension: dict) -> dict[str, Any]:
        return {"id": protocol.new_id("chatcmpl"), "object": "chat.completion", "created": protocol.now(),
                "model": self.params.model, "choices": choices,
                "usage": protocol.usage(len(self.tokens), self.completion, self.reasoning),
                "system_fingerprint": "mlxdist", name: extension}
