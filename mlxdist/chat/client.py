"""A small OpenAI-API chat client on the standard library (http.client), streaming
Server-Sent Events. Used by `mlxdist chat`, `mlxdist demo` and the serving benchmark."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import urlsplit

from mlxdist.errors import UserError


class ChatError(Exception):
    """The server answered with an error."""


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


@dataclass
class Answer:
    """One streamed answer and its timings."""

    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    reasoning_tokens: int | None = None  # from usage; None when the server gave no count
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    reasoning_done: float | None = None
    ended: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def tokens_per_second(self) -> float | None:
        if self.first_token is None or self.ended is None or self.completion_tokens < 2:
            return None
        return (self.completion_tokens - 1) / max(1e-9, self.ended - self.first_token)


class ChatClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600) -> None:
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"{url}: not an http(s) URL")
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base = parts.path.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.api_key, self.timeout = api_key, timeout
        self.conn: http.client.HTTPConnection | None = None
        self.resp: http.client.HTTPResponse | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.base}"

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _request(self, method: str, path: str, body: Any = None) -> http.client.HTTPResponse:
        conn = self._connect()
        try:
            conn.request(method, self.base + path, json.dumps(body) if body is not None else None, self._headers())
            resp = conn.getresponse()
        except OSError as e:
            conn.close()
            raise UserError(f"cannot reach the server at {self.url}: {e.strerror or e}")
        if resp.status != 200:
            raw = resp.read()
            conn.close()
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace")[:200]
            raise ChatError(f"HTTP {resp.status}: {message}")
        self.conn, self.resp = conn, resp
        return resp

    def get_json(self, path: str) -> Any:
        resp = self._request("GET", path)
        try:
            return json.loads(resp.read())
        finally:
            self.close()

    def model(self) -> str:
        return self.get_json("/v1/models")["data"][0]["id"]

    def stream_chat(self, messages: list[dict[str, str]], **params: Any) -> Iterator[Delta]:
        """Stream one answer as Deltas; the last carries finish_reason and then usage.
        `close()` (from another place, or on KeyboardInterrupt) drops the connection,
        which makes the server cancel the request."""
        body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}, **params}
        resp = self._request("POST", "/v1/chat/completions", body)
        try:
            yield from self._events(resp)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise ChatError(f"the connection to {self.url} broke: {e}") from None
        finally:
            self.close()

    def _events(self, resp: http.client.HTTPResponse) -> Iterator[Delta]:
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            obj = json.loads(data)
            if "error" in obj:
                raise ChatError(obj["error"].get("message", "error"))
            if obj.get("usage"):
                yield Delta(usage=obj["usage"])
            for choice in obj.get("choices", []):
                d = choice.get("delta") or {}
                yield Delta(delta_reasoning(d), d.get("content") or "", choice.get("finish_reason"))

    def ask(self, messages: list[dict[str, str]], **params: Any) -> Answer:
        """Stream a whole answer and time it."""
        answer = Answer()
        for d in self.stream_chat(messages, **params):
            note(answer, d)
        answer.ended = time.monotonic()
        return answer

    def close(self) -> None:
        """Drop the connection for real: the response's file object holds the socket open
        too, so both are closed (the server sees EOF and cancels the request)."""
        if self.resp is not None:
            try:
                self.resp.close()
            except Exception:
                pass
            self.resp = None
        if self.conn is not None:
            try:
                if self.conn.sock is not None:
                    self.conn.sock.close()
            finally:
                self.conn.close()
                self.conn = None


def note(answer: Answer, d: Delta) -> None:
    """Fold one Delta into an Answer (times first token and end of reasoning)."""
    if (d.reasoning or d.content) and answer.first_token is None:
        answer.first_token = time.monotonic()
    if d.content and answer.reasoning and answer.reasoning_done is None:
        answer.reasoning_done = time.monotonic()
    answer.reasoning += d.reasoning
    answer.content += d.content
    if d.reasoning or d.content:
        answer.completion_tokens += 1  # a fallback; usage replaces it when it comes
    if d.finish_reason:
        answer.finish_reason = d.finish_reason
    if d.usage:
        answer.completion_tokens = d.usage.get("completion_tokens", answer.completion_tokens)
        answer.prompt_tokens = d.usage.get("prompt_tokens", 0)
        answer.reasoning_tokens = reasoning_tokens(d.usage)


def delta_reasoning(delta: dict[str, Any]) -> str:
    """A delta's thinking: servers send it as `reasoning_content` (DeepSeek), `reasoning`
    (vLLM, OpenRouter) or both with the same text; it is taken once."""
    text = delta.get("reasoning_content") or delta.get("reasoning") or ""
    return text if isinstance(text, str) else ""


def reasoning_tokens(usage: dict[str, Any]) -> int | None:
    """`usage.completion_tokens_details.reasoning_tokens`, or None when it is not there."""
    details = usage.get("completion_tokens_details")
    count = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) else None
