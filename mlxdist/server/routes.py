"""The OpenAI API's endpoints, as one Starlette application over the engine.

Everything here runs on the server's event loop; what may take long (JSON parsing,
tokenizing, submitting to the engine) runs in a small thread pool, so a large request
never stalls another one, nor the engine's own threads (heartbeats, token loop). Every
failure of one request becomes an HTTP error for that request only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import traceback
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mlxdist.runtime.api import GenerationRequest, engine_health
from mlxdist.server import cluster_view, protocol, ttc
from mlxdist.server.generation import (ClientGone, Generation, admit, chat_tokens, decode, engine_errors,
                                      watch_disconnect)
from mlxdist.server.metrics import render
from mlxdist.server.protocol import ApiError, CompletionParams
from mlxdist.server.reasoning import ReasoningSplitter, prompt_opens_think
from mlxdist.server.responses import (ChoiceState, chat_chunk_choice, chat_message, completion_choice,
                                      completion_chunk_choice)
from mlxdist.server.state import Api

# the web console's files (package data, docs/console.md): public, they hold no data
CONSOLE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                 "/console/console.css": ("console.css", "text/css; charset=utf-8"),
                 "/console/console.js": ("console.js", "text/javascript; charset=utf-8")}
PUBLIC = {"/health", *CONSOLE_FILES}
MAX_CLUSTER_STREAMS = 16  # open /v1/cluster/stream connections; more: 429


def build_app(api: Api) -> Starlette:
    routes = {("GET", "/health"): _health, ("GET", "/v1/models"): _models, ("GET", "/metrics"): _metrics,
              ("POST", "/v1/chat/completions"): _chat, ("POST", "/v1/completions"): _completions,
              ("GET", "/v1/cluster"): _cluster, ("GET", "/v1/cluster/stream"): _cluster_stream,
              **{("GET", path): _console_file for path in CONSOLE_FILES}}

    async def dispatch(request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        handler = routes.get((request.method, path))
        endpoint = path if handler else "other"
        if handler is None:
            known = any(p == path for _, p in routes)
            err = (ApiError(405, f"{request.method} is not allowed on {path}", code="method_not_allowed")
                   if known else ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))
            return _finish(api, request, endpoint, _error(err, close=request.method == "POST"), time.monotonic())
        return await _guard(api, request, endpoint, handler)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", dispatch, methods=methods)])


# ---- plumbing ------------------------------------------------------------------------------

def _json(status: int, obj: Any, close: bool = False) -> Response:
    headers = {"Connection": "close"} if close else None
    return Response(json.dumps(obj).encode(), status, headers=headers, media_type="application/json")


def _error(e: ApiError, close: bool = False) -> Response:
    return _json(e.status, e.body(), close)


def _finish(api: Api, request: Request, endpoint: str, response: Response, t0: float) -> Response:
    if not isinstance(response, _EventStream):  # a stream counts and logs itself when it ends
        api.metrics.request_done(endpoint, response.status_code)
        api.log(request, response.status_code, t0)
    return response


def _authorized(api: Api, request: Request) -> bool:
    if not api.api_key:
        return True
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), api.api_key.encode())


async def _guard(api: Api, request: Request, endpoint: str,
                 work: Callable[[Api, Request], Awaitable[Response]]) -> Response:
    """Run one endpoint; every failure becomes an HTTP error, never a dead server."""
    t0 = time.monotonic()
    try:
        if endpoint not in PUBLIC and not _authorized(api, request):
            raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")
        response = await work(api, request)
    except ApiError as e:
        response = _error(e, close=e.close)
    except (ClientGone, ClientDisconnect):
        api.metrics.cancel()
        response = Response(b"", 499, headers={"Connection": "close"})
    except Exception as e:  # a bug: answer 500 and keep serving
        traceback.print_exc()
        response = _error(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"), close=True)
    if isinstance(response, _EventStream):
        response.t0, response.endpoint, response.request = t0, endpoint, request
    return _finish(api, request, endpoint, response, t0)


async def _read_json(api: Api, request: Request) -> Any:
    lengths = request.headers.getlist("content-length")
    if "chunked" in request.headers.get("transfer-encoding", "").lower() or not lengths:
        raise ApiError(411, "send the request body with a Content-Length header", close=True)
    if len(lengths) > 1:
        raise ApiError(400, "more than one Content-Length header", close=True)
    try:
        n = int(lengths[0])
    except ValueError:
        raise ApiError(400, "bad Content-Length header", close=True)
    if n < 0 or n > api.limits.max_body:
        # a body a little over the limit is read and dropped after the answer (the client,
        # still sending, would otherwise see a reset instead of the 413); a huge one is not
        raise ApiError(413, f"request body of {n} bytes is over the limit of {api.limits.max_body}",
                       code="request_too_large", close=n < 0 or n > 2 * api.limits.max_body)
    if api.body_gate is None:
        api.body_gate = asyncio.Semaphore(api.limits.body_readers)
    try:
        async with api.body_gate:
            raw = await asyncio.wait_for(request.body(), api.limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {api.limits.body_timeout_s:g} s",
                       code="request_timeout", close=True)
    return await api.run(_parse_json, raw)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json")
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json")


# ---- small endpoints -----------------------------------------------------------------------

async def _health(api: Api, request: Request) -> Response:
    h = engine_health(api.engine)
    body = {"status": h.status, "model": api.engine.model_name, "uptime_s": round(time.time() - api.started, 1)}
    if h.reason:
        body["reason"] = h.reason
    return _json(200 if h.status == "ok" else 503, body)


async def _models(api: Api, request: Request) -> Response:
    e = api.engine
    return _json(200, {"object": "list", "data": [{
        "id": e.model_name, "object": "model", "created": int(api.started), "owned_by": "mlxdist",
        "context_length": e.context_length}]})


async def _metrics(api: Api, request: Request) -> Response:
    text = await api.run(render, api.metrics, api.slots.active, api.slots.queued, api.slots.slots, api.engine.stats)
    return Response(text.encode(), 200, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _console_file(api: Api, request: Request) -> Response:
    name, media_type = CONSOLE_FILES[request.url.path]
    try:
        body = (resources.files("mlxdist.server") / "console" / name).read_bytes()
    except OSError:
        raise ApiError(404, f"this build has no console file {name}", code="not_found")
    return Response(body, 200, media_type=media_type, headers={"Cache-Control": "no-cache"})


def _live(api: Api) -> dict[str, Any]:
    m = api.metrics
    ttft = m.ttft_mean()
    return {"tokens_per_second": round(m.tokens_per_second(), 3), "active": api.slots.active,
            "queued": api.slots.queued, "slots": api.slots.slots,
            "ttft_mean_s": None if ttft is None else round(ttft, 4), "cancelled": m.cancelled}


async def _cluster(api: Api, request: Request) -> Response:
    return _json(200, await api.run(cluster_view.snapshot, api.engine, _live(api)))


async def _cluster_stream(api: Api, request: Request) -> Response:
    """Live numbers once a second as Server-Sent Events, until the client leaves."""
    if api.cluster_streams >= MAX_CLUSTER_STREAMS:
        raise ApiError(429, f"at most {MAX_CLUSTER_STREAMS} cluster streams at once", type="rate_limit_error",
                       code="rate_limit_exceeded")

    async def ticks() -> AsyncIterator[bytes]:
        api.cluster_streams += 1
        try:
            while True:
                update = await api.run(cluster_view.live_update, api.engine, _live(api))
                yield f"data: {json.dumps(update)}\n\n".encode()
                await asyncio.sleep(1.0)
        finally:
            api.cluster_streams -= 1

    return StreamingResponse(ticks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- generation ----------------------------------------------------------------------------

def _check_sampling(api: Api, params: CompletionParams) -> None:
    if api.vocab and params.sampling.top_k > api.vocab:
        raise ApiError(400, f"'top_k' must be at most the vocabulary size {api.vocab}, got {params.sampling.top_k}",
                       param="top_k")


def _check_text_fits(api: Api, chars: int, param: str) -> None:
    """Refuse, before tokenizing it, text that cannot fit the context whatever it holds:
    no token is longer than the vocabulary's longest."""
    if api.max_token_chars and chars > api.engine.context_length * api.max_token_chars:
        raise ApiError(400, f"the prompt has {chars} characters, more than this model's context of "
                       f"{api.engine.context_length} tokens can hold", param=param, code="context_length_exceeded")


async def _chat(api: Api, request: Request) -> Response:
    body = await _read_json(api, request)
    engine = api.engine
    params, messages = protocol.parse_chat(body, engine.model_name, engine.max_concurrent, api.efforts)
    _check_sampling(api, params)
    _check_text_fits(api, sum(len(m["content"]) for m in messages), "messages")
    spec = ttc.parse_ttc(body, engine.max_concurrent)
    if spec is not None:  # consensus or verifier search (ttc.py)
        return await ttc.run_ttc(api, request, params, messages, spec)
    tokens = await chat_tokens(api.run, engine, messages)
    inside = prompt_opens_think(decode(engine, tokens[-32:]))
    return await _generate(api, request, params, [tokens] * params.n, chat=True, starts_inside=inside)


async def _completions(api: Api, request: Request) -> Response:
    body = await _read_json(api, request)
    engine = api.engine
    params, raw_prompts = protocol.parse_completion(body, engine.model_name, engine.max_concurrent)
    _check_sampling(api, params)
    prompts = []
    for p in raw_prompts:
        if isinstance(p, str):
            _check_text_fits(api, len(p), "prompt")
            try:
                tokens = list(await api.run(engine.tokenizer.encode, p))
            except Exception as e:
                raise ApiError(400, f"the tokenizer refused the prompt: {e}", param="prompt")
        else:
            tokens = list(p)
            if api.vocab and any(not 0 <= t < api.vocab for t in tokens):
                raise ApiError(400, f"token ids must be in [0, {api.vocab})", param="prompt")
        prompts += [tokens] * params.n
    return await _generate(api, request, params, prompts, chat=False, starts_inside=False)


def _requests(api: Api, params: CompletionParams, prompts: list[list[int]], chat: bool,
              starts_inside: bool = False) -> list[GenerationRequest]:
    engine = api.engine
    thinking = api.thinking(params.thinking_budget, starts_inside) if chat else None
    out = []
    for i, tokens in enumerate(prompts):
        if not tokens:
            raise ApiError(400, "the prompt is empty", param="prompt")
        room = engine.context_length - len(tokens)
        if room < 1:
            raise ApiError(400, f"the prompt is {len(tokens)} tokens; this model's context is "
                           f"{engine.context_length} tokens", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        sampling = params.sampling
        if sampling.seed is not None and i % params.n:
            # n choices with one seed must still differ from each other
            sampling = type(sampling)(**{**sampling.__dict__, "seed": sampling.seed + i % params.n})
        out.append(GenerationRequest(
            prompt_tokens=tuple(tokens), max_tokens=min(params.max_tokens or room, room), sampling=sampling,
            stop_strings=params.stop, logprobs=max(1, params.top_logprobs) if params.logprobs else 0,
            thinking=thinking))
    return out


async def _generate(api: Api, request: Request, params: CompletionParams, prompts: list[list[int]],
                    chat: bool, starts_inside: bool) -> Response:
    t0 = time.monotonic()
    requests = _requests(api, params, prompts, chat, starts_inside)
    gone = asyncio.Event()
    watcher = asyncio.ensure_future(watch_disconnect(request.receive, gone.set))
    try:
        admitted = await admit(api.slots, len(requests), gone)
    finally:
        watcher.cancel()
    if not admitted:
        raise ClientGone
    try:
        api.metrics.tokens(prompt=sum(len(p) for p in prompts[::params.n]))
        with engine_errors():
            gen = await api.run(Generation, api.engine, requests, asyncio.get_running_loop())
    except BaseException:
        api.slots.release(len(requests))
        raise
    watcher = asyncio.ensure_future(watch_disconnect(request.receive, gen.client_gone))
    states = [ChoiceState(i, len(p), ReasoningSplitter(starts_inside) if chat else None)
              for i, p in enumerate(prompts)]
    run = _Run(api, gen, states, params, chat, t0, len(requests), watcher)
    if params.stream:
        return _EventStream(run)  # it gives back what the run holds when it ends
    try:
        return await run.whole()
    finally:
        run.close()


class _Run:
    """A running generation and what it holds: its slots, its engine requests and the task
    that watches the client; `close` gives all of them back, once."""

    def __init__(self, api: Api, gen: Generation, states: list[ChoiceState], params: CompletionParams,
                 chat: bool, t0: float, slots: int, watcher: asyncio.Future) -> None:
        self.api, self.gen, self.states, self.params, self.chat, self.t0 = api, gen, states, params, chat, t0
        self.slots, self.watcher, self.closed = slots, watcher, False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.watcher.cancel()
        self.gen.cancel()  # a no-op for finished requests; frees the rest
        self.api.slots.release(self.slots)

    async def collect(self) -> AsyncIterator[tuple[ChoiceState, str, str, Any, list]]:
        """Yield (state, reasoning, content, event, new logprobs) per event, with metrics kept."""
        first = True
        engine, metrics = self.api.engine, self.api.metrics
        token_text = lambda t: decode(engine, [t])  # noqa: E731
        async for index, event in self.gen.events():
            if event.token is not None:
                if first:
                    metrics.first_token(time.monotonic() - self.t0)
                    first = False
                metrics.tokens(completion=1)
            state = self.states[index]
            before = len(state.logprobs)
            r, c = state.add(event, token_text, self.params.logprobs, self.params.top_logprobs)
            yield state, r, c, event, state.logprobs[before:]

    async def whole(self) -> Response:
        params, states = self.params, self.states
        async for _ in self.collect():
            pass
        errors = [s.error for s in states if s.finish_reason == "error"]
        if errors:
            raise ApiError(500, f"generation failed: {errors[0]}", type="server_error")
        usage = _usage(states, params.n, self.chat)
        if self.chat:
            obj = {"id": protocol.new_id("chatcmpl"), "object": "chat.completion",
                   "choices": [chat_message(s, params.logprobs) for s in states]}
        else:
            obj = {"id": protocol.new_id("cmpl"), "object": "text_completion",
                   "choices": [completion_choice(s, params.logprobs) for s in states]}
        obj.update(created=protocol.now(), model=params.model, usage=usage, system_fingerprint="mlxdist")
        return _json(200, obj)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The SSE body: one `data:` line per chunk object, then `[DONE]`."""
        params, states, chat = self.params, self.states, self.chat
        base = {"id": protocol.new_id("chatcmpl" if chat else "cmpl"),
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": protocol.now(), "model": params.model, "system_fingerprint": "mlxdist"}

        def data(choices: list[dict], **extra: Any) -> bytes:
            obj = {**base, "choices": choices, **extra}
            if params.include_usage and "usage" not in extra:
                obj["usage"] = None
            return f"data: {json.dumps(obj)}\n\n".encode()

        if chat:
            yield data([chat_chunk_choice(s.index, {"role": "assistant", "content": ""}) for s in states])
        async for state, r, c, event, lps in self.collect():
            if event.finish_reason == "error":
                err = ApiError(500, f"generation failed: {event.error}", type="server_error")
                yield f"data: {json.dumps(err.body())}\n\n".encode()
                continue
            if chat:
                delta = {}
                if r:
                    delta["reasoning_content"] = delta["reasoning"] = r
                if c:
                    delta["content"] = c
                if delta or lps:
                    yield data([chat_chunk_choice(state.index, delta, logprobs=lps)])
                if event.finish_reason:
                    yield data([chat_chunk_choice(state.index, {}, state.finish_reason)])
            elif c or lps or event.finish_reason:
                yield data([completion_chunk_choice(state.index, c, state.finish_reason if event.finish_reason else None,
                                                    lps)])
        if params.include_usage:
            yield data([], usage=_usage(states, params.n, chat))
        yield b"data: [DONE]\n\n"


class _EventStream(Response):
    """A Server-Sent Events response that owns its run: whatever ends it (the last event,
    the client leaving, a slow reader, the server stopping), the run's slots and engine
    requests are given back."""

    media_type = "text/event-stream"

    def __init__(self, run: _Run) -> None:
        super().__init__(None, 200, headers={"Cache-Control": "no-cache"}, media_type=self.media_type)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]  # chunked
        self.run = run
        self.t0, self.endpoint, self.request = time.monotonic(), "other", None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        run, status = self.run, 200
        timeout = run.api.limits.write_timeout_s
        try:
            await asyncio.wait_for(send({"type": "http.response.start", "status": 200, "headers": self.raw_headers}),
                                   timeout)
            async for chunk in run.chunks():
                await asyncio.wait_for(send({"type": "http.response.body", "body": chunk, "more_body": True}),
                                       timeout)
            await asyncio.wait_for(send({"type": "http.response.body", "body": b"", "more_body": False}), timeout)
        except (ClientGone, asyncio.TimeoutError, OSError):
            status = 499
            run.api.metrics.cancel()
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            run.close()
            run.api.metrics.request_done(self.endpoint, status)
            if self.request is not None:
                run.api.log(self.request, status, self.t0)


def _usage(states: list[ChoiceState], n: int, chat: bool = False) -> dict[str, Any]:
    """Each prompt counts once, however many choices it has (they come in runs of n); a
    chat's thinking tokens are counted apart too."""
    return protocol.usage(sum(s.prompt_tokens for s in states[::n]), sum(s.completion_tokens for s in states),
                          sum(s.reasoning_tokens for s in states) if chat else None)
