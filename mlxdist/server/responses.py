"""Turn token events into OpenAI response objects: whole responses and stream chunks,
for chat (with reasoning kept apart) and plain completions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mlxdist.runtime.api import TokenEvent
from mlxdist.server.reasoning import ReasoningSplitter


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    prompt_tokens: int
    splitter: ReasoningSplitter | None  # chat only
    reasoning: str = ""
    content: str = ""
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # of them, the thinking's (the engine marks its tokens)
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    text_offset: int = 0

    def add(self, event: TokenEvent, token_text: Callable[[int], str], want_logprobs: bool,
            top: int = 0) -> tuple[str, str]:
        """Take one event; return the (reasoning, content) text it adds. With `top`, the
        entry keeps that many of the most likely tokens (the runtime's top_logprobs)."""
        if event.token is not None:
            self.completion_tokens += 1
            self.reasoning_tokens += event.thinking
            if want_logprobs:
                self.logprobs.append({"token": token_text(event.token), "logprob": event.logprob,
                                      "offset": len(self.content) + len(self.reasoning),
                                      "top": [(token_text(t), lp) for t, lp in event.top_logprobs[:top]]})
        if self.splitter is not None:
            r, c = self.splitter.feed(event.text)
        else:
            r, c = "", event.text
        if event.finish_reason:
            if self.splitter is not None:
                r2, c2 = self.splitter.flush()
                r, c = r + r2, c + c2
            self.finish_reason = "stop" if event.finish_reason == "cancelled" else event.finish_reason
            self.error = event.error
        self.reasoning += r
        self.content += c
        return r, c


def _chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    def one(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob if logprob is not None else 0.0,
                "bytes": list(token.encode("utf-8"))}

    return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries]}


def _completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    # legacy completions: a {token text: logprob} map per position (texts may collide;
    # the more likely one is kept, as it comes first)
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t: lp for t, lp in reversed(e["top"])} if e["top"] else None for e in entries],
            "text_offset": [e["offset"] for e in entries]}


def chat_message(c: ChoiceState, want_logprobs: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.content}
    if c.reasoning:  # DeepSeek's name (llama.cpp, SGLang) and vLLM's (mlx-lm, OpenRouter)
        message["reasoning_content"] = message["reasoning"] = c.reasoning
    return {"index": c.index, "message": message, "finish_reason": c.finish_reason,
            "logprobs": _chat_logprobs(c.logprobs) if want_logprobs else None}


def completion_choice(c: ChoiceState, want_logprobs: bool) -> dict[str, Any]:
    return {"index": c.index, "text": c.content, "finish_reason": c.finish_reason,
            "logprobs": _completion_logprobs(c.logprobs) if want_logprobs else None}


def chat_chunk_choice(index: int, delta: dict[str, Any], finish_reason: str | None = None,
                      logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish_reason,
            "logprobs": _chat_logprobs(logprobs) if logprobs else None}


def completion_chunk_choice(index: int, text: str, finish_reason: str | None = None,
                            logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason,
            "logprobs": _completion_logprobs(logprobs) if logprobs else None}
