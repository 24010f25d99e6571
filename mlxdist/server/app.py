"""The OpenAI-compatible HTTP server, on the standard library's ThreadingHTTPServer.

One thread per connection. A generation's tokens are written as Server-Sent Events in
HTTP/1.1 chunks and flushed one by one; a failed write, or the client's socket closing
while we wait for tokens, means the client is gone: its requests are cancelled and its
slots freed at once.
"""

from __future__ import annotations

import hmac
import json
import select
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mlxdist.runtime.api import Engine, GenerationRequest
from mlxdist.server import protocol
from mlxdist.server.generation import ClientGone, Generation
from mlxdist.server.metrics import Metrics, render
from mlxdist.server.protocol import ApiError, CompletionParams
from mlxdist.server.reasoning import ReasoningSplitter, prompt_opens_think
from mlxdist.server.responses import (ChoiceState, chat_chunk_choice, chat_message, completion_choice,
                                      completion_chunk_choice)
from mlxdist.server.slots import QueueFull, Slots

MAX_BODY = 4 << 20


class ApiServer:
    """Serves one engine. `start()` runs it in a background thread (tests, the demo,
    `mlxdist chat MODEL`); `serve_forever()` in the caller's."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
                 max_queue: int = 64, max_body: int = MAX_BODY, quiet: bool = False) -> None:
        self.engine, self.api_key, self.max_body, self.quiet = engine, api_key, max_body, quiet
        self.slots = Slots(engine.max_concurrent, max_queue)
        self.metrics = Metrics()
        self.started = time.time()
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "ApiServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True,
                                        name="api-server")
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    app: ApiServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlxdist"
    timeout = 600  # an idle keep-alive connection is dropped after this
    server: _HTTPServer

    # ---- plumbing -------------------------------------------------------------------------

    @property
    def app(self) -> ApiServer:
        return self.server.app

    def log_message(self, format: str, *args: Any) -> None:
        if not self.app.quiet:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, e: ApiError) -> None:
        self._json(e.status, e.body())

    def _client_gone(self) -> bool:
        """The peer closed its side (EOF waiting on the socket), without consuming data."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _authorized(self) -> bool:
        key = self.app.api_key
        if not key:
            return True
        header = self.headers.get("Authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else self.headers.get("X-Api-Key", "")
        return hmac.compare_digest(given.encode(), key.encode())

    def _guard(self, endpoint: str, work) -> None:
        """Run one endpoint; every failure becomes an HTTP error, never a dead server."""
        status = 200
        try:
            if endpoint != "/health" and not self._authorized():
                raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'",
                               type="authentication_error", code="invalid_api_key")
            status = work() or 200
        except ApiError as e:
            status = e.status
            self._error(e)
        except ClientGone:
            status = 499
            self.app.metrics.cancel()
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            status = 499
            self.close_connection = True
        except Exception as e:  # a bug: answer 500 and keep serving
            traceback.print_exc()
            status = 500
            self.close_connection = True
            try:
                self._error(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))
            except OSError:
                pass
        self.app.metrics.request_done(endpoint, status)

    # ---- routes ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {"/health": self._health, "/v1/models": self._models, "/metrics": self._metrics}
        if path not in routes:
            return self._guard("other", lambda: self._not_found())
        self._guard(path, routes[path])

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {"/v1/chat/completions": self._chat, "/v1/completions": self._completions}
        if path not in routes:
            self.close_connection = True  # the body was not read
            return self._guard("other", lambda: self._not_found())
        self._guard(path, routes[path])

    def _not_found(self) -> None:
        raise ApiError(404, f"no route {self.command} {self.path}", code="not_found")

    def _health(self) -> None:
        self._json(200, {"status": "ok", "model": self.app.engine.model_name,
                         "uptime_s": round(time.time() - self.app.started, 1)})

    def _models(self) -> None:
        e = self.app.engine
        self._json(200, {"object": "list", "data": [{
            "id": e.model_name, "object": "model", "created": int(self.app.started), "owned_by": "mlxdist",
            "context_length": e.context_length}]})

    def _metrics(self) -> None:
        a = self.app
        text = render(a.metrics, a.slots.active, a.slots.queued, a.slots.slots, a.engine.stats)
        self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    # ---- generation -----------------------------------------------------------------------

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise ApiError(411, "send the request body with a Content-Length header")
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "bad Content-Length header")
        if n < 0 or n > self.app.max_body:
            self.close_connection = True  # the body is left unread
            raise ApiError(413, f"request body of {n} bytes is over the limit of {self.app.max_body}",
                           code="request_too_large")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json")

    def _chat(self) -> None:
        body = self._read_json()
        engine = self.app.engine
        params, messages = protocol.parse_chat(body, engine.model_name, engine.max_concurrent)
        try:
            tokens = list(engine.encode_chat(messages))
        except Exception as e:
            raise ApiError(400, f"the model's chat template refused these messages: {e}", param="messages")
        inside = prompt_opens_think(_decode(engine, tokens[-32:]))
        prompts = [tokens] * params.n
        self._generate(params, prompts, chat=True, starts_inside=inside)

    def _completions(self) -> None:
        body = self._read_json()
        engine = self.app.engine
        params, raw_prompts = protocol.parse_completion(body, engine.model_name, engine.max_concurrent)
        vocab = _vocab_size(engine)
        prompts = []
        for p in raw_prompts:
            if isinstance(p, str):
                tokens = list(engine.tokenizer.encode(p))
            else:
                tokens = list(p)
                if vocab and any(not 0 <= t < vocab for t in tokens):
                    raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
            prompts += [tokens] * params.n
        self._generate(params, prompts, chat=False, starts_inside=False)

    def _generate(self, params: CompletionParams, prompts: list[list[int]], chat: bool, starts_inside: bool) -> None:
        app, engine = self.app, self.app.engine
        t0 = time.monotonic()
        requests = []
        for i, tokens in enumerate(prompts):
            if not tokens:
                raise ApiError(400, "the prompt is empty", param="prompt")
            room = engine.context_length - len(tokens)
            if room < 1:
                raise ApiError(400, f"the prompt is {len(tokens)} tokens; this model's context is "
                               f"{engine.context_length} tokens", param="messages" if chat else "prompt",
                               code="context_length_exceeded")
            seed = params.sampling.seed
            sampling = params.sampling
            if seed is not None and i % params.n:
                # n choices with one seed must still differ from each other
                sampling = type(sampling)(**{**sampling.__dict__, "seed": seed + i % params.n})
            requests.append(GenerationRequest(
                prompt_tokens=tuple(tokens), max_tokens=min(params.max_tokens or room, room), sampling=sampling,
                stop_strings=params.stop, logprobs=max(1, params.top_logprobs) if params.logprobs else 0))
        try:
            if not app.slots.acquire(len(requests), self._client_gone):
                raise ClientGone
        except QueueFull:
            raise ApiError(429, "the server is busy: too many requests waiting; try again shortly",
                           type="rate_limit_error", code="rate_limit_exceeded")
        try:
            app.metrics.tokens(prompt=sum(len(p) for p in prompts[::params.n]))
            try:
                gen = Generation(engine, requests)
            except ValueError as e:  # the engine refused the request itself
                raise ApiError(400, str(e))
            except RuntimeError as e:  # closed, or a rank failed
                raise ApiError(503, f"the model is not available: {e}", type="server_error",
                               code="engine_unavailable")
            try:
                states = [ChoiceState(i, len(p), ReasoningSplitter(starts_inside) if chat else None)
                          for i, p in enumerate(prompts)]
                if params.stream:
                    self._stream(gen, states, params, chat, t0)
                else:
                    self._whole(gen, states, params, chat, t0)
            finally:
                gen.cancel()  # a no-op for finished requests; frees the rest
        finally:
            app.slots.release(len(requests))

    def _collect(self, gen: Generation, states: list[ChoiceState], params: CompletionParams, t0: float):
        """Yield (state, reasoning, content, event) per event, with metrics kept."""
        first = True
        token_text = lambda t: _decode(self.app.engine, [t])  # noqa: E731
        for index, event in gen.events(self._client_gone):
            if event.token is not None:
                if first:
                    self.app.metrics.first_token(time.monotonic() - t0)
                    first = False
                self.app.metrics.tokens(completion=1)
            state = states[index]
            before = len(state.logprobs)
            r, c = state.add(event, token_text, params.logprobs, params.top_logprobs)
            yield state, r, c, event, state.logprobs[before:]

    def _whole(self, gen: Generation, states: list[ChoiceState], params: CompletionParams, chat: bool, t0: float) -> None:
        for _ in self._collect(gen, states, params, t0):
            pass
        errors = [s.error for s in states if s.finish_reason == "error"]
        if errors:
            raise ApiError(500, f"generation failed: {errors[0]}", type="server_error")
        usage = _usage(states, params.n)
        if chat:
            obj = {"id": protocol.new_id("chatcmpl"), "object": "chat.completion",
                   "choices": [chat_message(s, params.logprobs) for s in states]}
        else:
            obj = {"id": protocol.new_id("cmpl"), "object": "text_completion",
                   "choices": [completion_choice(s, params.logprobs) for s in states]}
        obj.update(created=protocol.now(), model=params.model, usage=usage, system_fingerprint="mlxdist")
        self._json(200, obj)

    def _stream(self, gen: Generation, states: list[ChoiceState], params: CompletionParams, chat: bool, t0: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": protocol.new_id("chatcmpl" if chat else "cmpl"),
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": protocol.now(), "model": params.model, "system_fingerprint": "mlxdist"}

        def send(choices: list[dict], **extra: Any) -> None:
            obj = {**base, "choices": choices, **extra}
            if params.include_usage and "usage" not in extra:
                obj["usage"] = None
            self._chunk(f"data: {json.dumps(obj)}\n\n".encode())

        if chat:
            send([chat_chunk_choice(s.index, {"role": "assistant", "content": ""}) for s in states])
        for state, r, c, event, lps in self._collect(gen, states, params, t0):
            if event.finish_reason == "error":
                self._chunk(f"data: {json.dumps(ApiError(500, f'generation failed: {event.error}', type='server_error').body())}\n\n".encode())
                continue
            if chat:
                delta = {}
                if r:
                    delta["reasoning_content"] = r
                if c:
                    delta["content"] = c
                if delta or lps:
                    send([chat_chunk_choice(state.index, delta, logprobs=lps)])
                if event.finish_reason:
                    send([chat_chunk_choice(state.index, {}, state.finish_reason)])
            else:
                if c or lps or event.finish_reason:
                    send([completion_chunk_choice(state.index, c, state.finish_reason if event.finish_reason else None, lps)])
        if params.include_usage:
            send([], usage=_usage(states, params.n))
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        """One HTTP/1.1 chunk, flushed now; an empty one ends the body."""
        try:
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        except OSError:
            raise ClientGone


def _usage(states: list[ChoiceState], n: int) -> dict[str, int]:
    """Each prompt counts once, however many choices it has (they come in runs of n)."""
    return protocol.usage(sum(s.prompt_tokens for s in states[::n]), sum(s.completion_tokens for s in states))


def _decode(engine: Engine, tokens: list[int]) -> str:
    try:
        return engine.tokenizer.decode(tokens)
    except Exception:
        return ""


def _vocab_size(engine: Engine) -> int:
    try:
        return int(len(engine.tokenizer.vocab) if hasattr(engine.tokenizer, "vocab") else 0)
    except Exception:
        return 0
