"""Sampling on the last stage, with a random key per request.

mlx-lm's samplers draw from the global `mx.random` state, so a request's tokens would
depend on what else ran before it. Here each request owns a key (from its seed) that is
split once per token, so a seeded request gives the same tokens alone, among others, and
over any number of ranks. The filters (top-p, min-p, top-k) and the repetition penalty
are mlx-lm's own functions, applied in mlx-lm's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxdist.runtime.api import SamplingParams

PARAM_WORDS = 10  # int32 words before the prompt tail in a SETUP payload


def encode_params(p: SamplingParams, seed: int, logprobs: int, prompt: list[int]) -> np.ndarray:
    """SamplingParams as int32 words (floats bit-cast), followed by the prompt tail the
    repetition penalty looks at."""
    tail = prompt[-p.repetition_context:] if p.repetition_penalty != 1.0 and p.repetition_context > 0 else []
    floats = np.array([p.temperature, p.top_p, p.min_p, p.repetition_penalty], np.float32).view(np.int32)
    head = np.array([floats[0], floats[1], p.top_k, floats[2], floats[3], p.repetition_context,
                     (seed >> 31) & 0x7FFFFFFF, seed & 0x7FFFFFFF, logprobs, len(tail)], np.int32)
    return np.concatenate([head, np.array(tail, np.int32)])


@dataclass
class SlotSampler:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    repetition_context: int
    key: mx.array
    history: mx.array  # int32 tokens the repetition penalty sees (kept on device)

    @classmethod
    def decode(cls, words: np.ndarray) -> "SlotSampler":
        w = words.astype(np.int32)
        f = w[[0, 1, 3, 4]].view(np.float32)
        seed = (int(w[6]) << 31) | int(w[7])
        n_tail = int(w[9])
        return cls(temperature=float(f[0]), top_p=float(f[1]), top_k=int(w[2]), min_p=float(f[2]),
                   repetition_penalty=float(f[3]), repetition_context=int(w[5]),
                   key=mx.random.key(seed), history=mx.array(w[PARAM_WORDS:PARAM_WORDS + n_tail]))

    def sample(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """logits [1, V] -> (token [1] int32, its logprob [1] float32). Lazy."""
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_repetition_penalty

        if self.repetition_penalty != 1.0 and self.repetition_context > 0:
            penalty = make_repetition_penalty(self.repetition_penalty, self.repetition_context)
            if self.history.size:
                logits = penalty(self.history, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        if self.temperature == 0:
            token = mx.argmax(logprobs, axis=-1)
        else:
            x = logprobs
            if 0 < self.top_p < 1.0:
                x = apply_top_p(x, self.top_p)
            if self.min_p != 0.0:
                x = apply_min_p(x, self.min_p, 1)
            if self.top_k > 0:
                x = apply_top_k(x, self.top_k)
            self.key, sub = mx.random.split(self.key)
            token = mx.random.categorical(x * (1.0 / self.temperature), key=sub)
        token = token.astype(mx.int32)
        if self.repetition_penalty != 1.0:
            self.history = mx.concatenate([self.history, token])[-self.repetition_context:]
        return token, mx.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0].astype(mx.float32)
