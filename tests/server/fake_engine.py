"""A small deterministic Engine for fast protocol tests: one character per token, a
scripted answer per prompt, a settable delay per token, and bookkeeping the tests read."""

from __future__ import annotations

import threading
from typing import Iterator, Sequence

from mlxdist.runtime.api import GenerationRequest, TokenEvent

EOS = 0


class FakeTokenizer:
    eos_token_ids = {EOS}
    vocab = {chr(i): i for i in range(256)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [min(ord(c), 255) for c in text]

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(chr(t) for t in tokens if t != EOS)


def answer_for(prompt: str) -> str:
    """The script: a question gets 'Answer to <question>'; 'think:' questions (or a
    prompt left inside <think>) get reasoning first."""
    last = prompt.rsplit("<|user|>", 1)[-1].split("\n", 1)[0]
    if prompt.endswith("<think>\n"):
        return f"I ponder {last}.\n</think>\n\nAnswer to {last}"
    if "think:" in last:
        return f"<think>\nI ponder {last}.\n</think>\n\nAnswer to {last}"
    return f"Answer to {last}"


class FakeHandle:
    def __init__(self, engine: "FakeEngine", request_id: int, request: GenerationRequest) -> None:
        self.engine, self.request_id, self.request = engine, request_id, request
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[TokenEvent]:
        e, r = self.engine, self.request
        text = answer_for(e.tokenizer.decode(r.prompt_tokens))
        cuts = [text.index(s) for s in r.stop_strings if s in text]
        if cuts:
            text = text[: min(cuts)]
        try:
            if "fail" in text:
                raise RuntimeError("the fake engine was asked to fail")
            for i, ch in enumerate(text):
                if self.cancelled.wait(e.delay):
                    yield TokenEvent(None, "", finish_reason="cancelled")
                    return
                last = i + 1 == r.max_tokens
                # alternatives, when asked: the token itself, then the next characters
                top = tuple((ord(ch) + k, -0.5 - k) for k in range(r.logprobs))
                yield TokenEvent(ord(ch), ch, -0.5, finish_reason="length" if last else None, top_logprobs=top)
                if last:
                    return
            yield TokenEvent(EOS, "", -0.1, finish_reason="stop")
        finally:
            with e.lock:
                e.active -= 1
                e.finished += 1


class FakeEngine:
    def __init__(self, model_name: str = "fake", delay: float = 0.0, max_concurrent: int = 4,
                 context_length: int = 256, reasoner: bool = False) -> None:
        self.model_name, self.delay, self.max_concurrent = model_name, delay, max_concurrent
        self.context_length, self.reasoner = context_length, reasoner
        self.tokenizer = FakeTokenizer()
        self.lock = threading.Lock()
        self.requests: list[GenerationRequest] = []
        self.active = self.finished = self.peak = 0
        self.closed = False

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
        if self.reasoner:
            text += "<think>\n"
        return self.tokenizer.encode(text)

    def submit(self, request: GenerationRequest) -> FakeHandle:
        with self.lock:
            self.requests.append(request)
            self.active += 1
            self.peak = max(self.peak, self.active)
            return FakeHandle(self, len(self.requests), request)

    def stats(self) -> dict[str, float]:
        with self.lock:
            return {"active": self.active, "finished": self.finished, "stage0_seconds": 0.25}

    def close(self) -> None:
        self.closed = True
