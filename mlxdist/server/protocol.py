"""The OpenAI request and response shapes: validate what comes in, build what goes out.

Pure functions over dicts, no sockets: every mistake in a request becomes an `ApiError`
that the HTTP layer turns into a 4xx with OpenAI's error JSON.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from mlxdist.runtime.api import SamplingParams

MAX_STOP_STRINGS = 4
MAX_N = 16
MAX_LOGPROBS = 20
# `reasoning_effort` -> tokens of thinking (serve --reasoning-budgets changes them)
EFFORT_BUDGETS = {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": 16384}


class ApiError(Exception):
    """A request the server refuses; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.close = close  # end the connection after the answer (its framing cannot be trusted)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionParams:
    """What both endpoints share, checked."""

    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: up to the end of the context
    sampling: SamplingParams
    stop: tuple[str, ...]
    n: int
    logprobs: bool
    top_logprobs: int
    thinking_budget: int | None = None  # tokens of thinking allowed (chat); None: no limit


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _get(body: dict, key: str, types: tuple[type, ...], default: Any = None, what: str = "") -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    # bool is an int in Python: refuse `true` where a number is expected
    if isinstance(value, bool) and bool not in types:
        raise _bad(f"'{key}' must be {what}", param=key)
    if not isinstance(value, types):
        raise _bad(f"'{key}' must be {what}", param=key)
    return value


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = float(_get(body, key, (int, float), default, "a number"))
    if not lo <= value <= hi:
        raise _bad(f"'{key}' must be between {lo} and {hi}, got {value}", param=key)
    return value


def parse_common(body: Any, served_model: str, max_n: int = MAX_N) -> CompletionParams:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = _get(body, "model", (str,), served_model, "a string")
    if model != served_model:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{served_model}'",
                       param="model", code="model_not_found")
    stream = _get(body, "stream", (bool,), False, "a boolean")
    options = _get(body, "stream_options", (dict,), {}, "an object")
    include_usage = _get(options, "include_usage", (bool,), False, "a boolean")

    max_tokens = _get(body, "max_completion_tokens", (int,), None, "an integer")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", (int,), None, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise _bad(f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")

    seed = _get(body, "seed", (int,), None, "an integer")
    if seed is not None and not -(1 << 63) <= seed < (1 << 64):
        raise _bad("'seed' must fit in 64 bits", param="seed")
    sampling = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=int(_number(body, "top_k", 0, 0, 1 << 20)),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0),
        seed=seed,
    )
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise _bad("'stop' must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP_STRINGS or any(s == "" for s in stop):
        raise _bad(f"'stop' takes up to {MAX_STOP_STRINGS} non-empty strings", param="stop")

    n = _get(body, "n", (int,), 1, "an integer")
    if not 1 <= n <= max_n:
        raise _bad(f"'n' must be between 1 and {max_n}, got {n}", param="n")
    return CompletionParams(model, stream, include_usage, max_tokens, sampling, stop, n, False, 0)


def _content_text(content: Any, i: int) -> str:
    """Message content: a string, or a list of text parts (images are not supported)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(f"messages[{i}].content parts must be {{'type': 'text', 'text': ...}}",
                           param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        content = m.get("content")
        text = "" if content is None and role == "assistant" else _content_text(content, i)
        # reasoning_content of earlier turns is not sent back to the model (DeepSeek's rule)
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def parse_chat(body: Any, served_model: str, max_n: int = MAX_N,
               efforts: dict[str, int] | None = None) -> tuple[CompletionParams, list[dict[str, str]]]:
    params = parse_common(body, served_model, max_n)
    messages = parse_messages(body)
    logprobs = _get(body, "logprobs", (bool,), False, "a boolean")
    top = _get(body, "top_logprobs", (int,), 0, "an integer")
    if not 0 <= top <= MAX_LOGPROBS:
        raise _bad(f"'top_logprobs' must be between 0 and {MAX_LOGPROBS}", param="top_logprobs")
    params = _with_logprobs(params, logprobs, top)
    return replace(params, thinking_budget=parse_thinking_budget(body, efforts or EFFORT_BUDGETS)), messages


def _budget_number(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(f"'{name}' must be a whole number of tokens, 0 or more", param=name.split(".")[0])
    return value


def parse_thinking_budget(body: dict, efforts: dict[str, int]) -> int | None:
    """The thinking budget, however the client spells it: OpenAI's `reasoning_effort`,
    vLLM's `thinking_token_budget`, llama.cpp's `thinking_budget_tokens`, SGLang's
    `thinking_budget`, Anthropic's `thinking: {"type": "enabled", "budget_tokens": N}`
    (`{"type": "disabled"}`: 0) and OpenRouter's `reasoning: {"max_tokens": N}` (or
    `{"effort": ...}`, `{"enabled": false}`). Several that disagree: 400."""
    found: dict[str, int] = {}

    def effort(value: Any, name: str) -> None:
        if not isinstance(value, str) or value not in efforts:
            raise _bad(f"'{name}' must be one of {', '.join(efforts)}", param=name.split(".")[0])
        found[name] = efforts[value]

    if body.get("reasoning_effort") is not None:
        effort(body["reasoning_effort"], "reasoning_effort")
    for name in ("thinking_token_budget", "thinking_budget_tokens", "thinking_budget"):
        if body.get(name) is not None:
            found[name] = _budget_number(body[name], name)
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type", "enabled") not in ("enabled", "disabled"):
            raise _bad("'thinking' must be {\"type\": \"enabled\", \"budget_tokens\": N} or {\"type\": \"disabled\"}",
                       param="thinking")
        if thinking.get("type") == "disabled":
            found["thinking"] = 0
        elif thinking.get("budget_tokens") is not None:
            found["thinking.budget_tokens"] = _budget_number(thinking["budget_tokens"], "thinking.budget_tokens")
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise _bad("'reasoning' must be an object such as {\"max_tokens\": N}", param="reasoning")
        if reasoning.get("enabled") is False:
            found["reasoning.enabled"] = 0
        if reasoning.get("max_tokens") is not None:
            found["reasoning.max_tokens"] = _budget_number(reasoning["max_tokens"], "reasoning.max_tokens")
        elif reasoning.get("effort") is not None:
            effort(reasoning["effort"], "reasoning.effort")
    if len(set(found.values())) > 1:
        said = ", ".join(f"{k}={v}" for k, v in found.items())
        raise _bad(f"conflicting thinking budgets ({said}): send one", param=next(iter(found)).split(".")[0])
    return next(iter(found.values()), None)


def parse_completion(body: Any, served_model: str, max_n: int = MAX_N) -> tuple[CompletionParams, list[str | list[int]]]:
    params = parse_common(body, served_model, max_n)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(
        isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt
    ):
        prompts = list(prompt)
    elif prompt is None:
        raise _bad("'prompt' is required", param="prompt")
    else:
        raise _bad("'prompt' must be a string, a list of strings, or a list of token ids", param="prompt")
    if len(prompts) * params.n > max_n:
        raise _bad(f"at most {max_n} completions per request (prompts x n)", param="n")
    lp = _get(body, "logprobs", (int,), None, "an integer")
    if lp is not None and not 0 <= lp <= 5:
        raise _bad("'logprobs' must be between 0 and 5", param="logprobs")
    if body.get("echo"):
        raise _bad("'echo' is not supported", param="echo")
    return _with_logprobs(params, lp is not None, lp or 0), prompts


def _with_logprobs(p: CompletionParams, logprobs: bool, top: int) -> CompletionParams:
    return replace(p, logprobs=logprobs, top_logprobs=top)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out
