"""Sampling on the last stage, with a random key per request.

mlx-lm's samplers draw from the global `mx.random` state, so a request's tokens would
depend on what else ran before it. Here each request owns a key (from its seed) that is
split once per token, so a seeded request gives the same tokens alone, among others, and
over any number of ranks. The filters (top-p, min-p, top-k) and the repetition penalty
are mlx-lm's own functions, applied in mlx-lm's order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxdist.runtime.api import SamplingParams

PARAM_WORDS = 10  # int32 words before the prompt tail in a SETUP payload
MAX_TOP_LOGPROBS = 20


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
    top_k_logprobs: int = 0  # how many of the most likely tokens to report per step

    @classmethod
    def decode(cls, words: np.ndarray) -> "SlotSampler":
        w = words.astype(np.int32)
        f = w[[0, 1, 3, 4]].view(np.float32)
        seed = (int(w[6]) << 31) | int(w[7])
        n_tail = int(w[9])
        return cls(temperature=float(f[0]), top_p=float(f[1]), top_k=int(w[2]), min_p=float(f[2]),
                   repetition_penalty=float(f[3]), repetition_context=int(w[5]),
                   key=mx.random.key(seed), history=mx.array(w[PARAM_WORDS:PARAM_WORDS + n_tail]),
                   top_k_logprobs=min(int(w[8]), MAX_TOP_LOGPROBS))

    def sample(self, logits: mx.array) -> tuple[mx.array, mx.array, mx.array | None]:
        """logits [1, V] -> (token [1] int32, its logprob [1] float32, and when asked the
        top-k as int32 [2k]: ids then logprobs bit-cast, most likely first). Lazy.

        A failure here belongs to this request alone: it is logged and answered with token 0
        and a NaN logprob, which the engine turns into an error for this request (as it
        does a NaN from the model); the stage, its other slots and the group go on."""
        try:
            return self._sample(logits)
        except Exception as e:  # noqa: BLE001 - isolate the request, never the process
            print(f"sampler failed for one request: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            top = None
            if self.top_k_logprobs > 0:
                top = mx.zeros((2 * min(self.top_k_logprobs, logits.shape[-1]),), dtype=mx.int32)
            return mx.zeros((1,), dtype=mx.int32), mx.array([float("nan")], dtype=mx.float32), top

    def _sample(self, logits: mx.array) -> tuple[mx.array, mx.array, mx.array | None]:
        from mlx_lm.sample_utils import make_repetition_penalty

        if self.repetition_penalty != 1.0 and self.repetition_context > 0:
            penalty = make_repetition_penalty(self.repetition_penalty, self.repetition_context)
            if self.history.size:
                logits = penalty(self.history, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        if self.temperature == 0:
            token = mx.argmax(logprobs, axis=-1)
        else:
            token = draw(filtered(logprobs, self), [self.noise(logprobs.shape[-1])], self.temperature)
        token = token.astype(mx.int32)
        if self.repetition_penalty != 1.0:
            self.history = mx.concatenate([self.history, token])[-self.repetition_context:]
        chosen = mx.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0].astype(mx.float32)
        top = None
        if self.top_k_logprobs > 0:
            k = min(self.top_k_logprobs, logprobs.shape[-1])
            ids = mx.argsort(-logprobs[0])[:k].astype(mx.int32)
            top = mx.concatenate([ids, logprobs[0][ids].astype(mx.float32).view(mx.int32)])
        return token, chosen, top


    def noise(self, vocab: int) -> mx.array:
        """This request's Gumbel noise for its next token [1, V], from its own key (split
        once per token): the same whether it is sampled alone or in a batch."""
        self.key, sub = mx.random.split(self.key)
        return mx.random.gumbel(shape=(1, vocab), key=sub)

    @property
    def simple(self) -> bool:
        """Sampled with filters only (no repetition penalty, no top logprobs): rows alike
        in this are sampled together (batch.sample_rows)."""
        return (self.top_k_logprobs == 0 and (self.repetition_penalty == 1.0 or self.repetition_context <= 0))

    def filters(self) -> tuple[float, float, float, int]:
        return (self.temperature, self.top_p, self.min_p, self.top_k)


def filtered(logprobs: mx.array, s: SlotSampler) -> mx.array:
    """mlx-lm's filters, in its order, over rows [B, V] that share `s`'s settings."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    x = logprobs
    if 0 < s.top_p < 1.0:
        x = apply_top_p(x, s.top_p)
    if s.min_p != 0.0:
        x = apply_min_p(x, s.min_p, 1)
    if 0 < s.top_k < x.shape[-1]:  # top_k >= the vocabulary filters nothing
        x = apply_top_k(x, s.top_k)
    return x


def draw(x: mx.array, noise: mx.array | list[mx.array], temperature: float) -> mx.array:
    """A categorical draw per row of `x` [B, V] at `temperature`, each with its own noise
    (the Gumbel-max trick: the largest of logit / T + Gumbel noise)."""
    if isinstance(noise, list):
        noise = noise[0] if len(noise) == 1 else mx.concatenate(noise)
    return mx.argmax(x * (1.0 / temperature) + noise, axis=-1)


_split_rows = mx.vmap(mx.random.split)


def rows_noise(samplers: list[SlotSampler], vocab: int) -> mx.array:
    """The Gumbel noise [B, V] of several rows' next tokens, each row's from its own key
    exactly as `SlotSampler.noise` draws it alone, but as one batched split and one batched
    draw (a handful of operations for the batch instead of a handful per row: on a GPU each
    is a kernel launch the host pays for)."""
    if len(samplers) == 1:
        return samplers[0].noise(vocab)
    pairs = _split_rows(mx.stack([s.key for s in samplers]))  # [B, 2, 2]: (next key, subkey)
    for i, s in enumerate(samplers):
        s.key = pairs[i, 0]
    return mx.vmap(lambda k: mx.random.gumbel(shape=(vocab,), key=k))(pairs[:, 1])


def decode_top(words: np.ndarray) -> list[tuple[int, float]]:
    k = len(words) // 2
    return list(zip((int(i) for i in words[:k]), (float(v) for v in words[k:].astype(np.int32).view(np.float32))))
