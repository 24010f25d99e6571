"""The last stage's draw against numpy: rows sampled together (one batched draw, each
row its own key) follow softmax(logits / T) restricted to mlx-lm's filters, and a seeded
row draws the same alone and in a batch."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxdist.runtime.api import SamplingParams
from mlxdist.runtime.batch import sample_rows
from mlxdist.runtime.sampling import SlotSampler, encode_params

LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], np.float32))


def _samplers(n: int, **kw) -> list[SlotSampler]:
    return [SlotSampler.decode(encode_params(SamplingParams(**kw), seed=1000 + i, logprobs=0, prompt=[]))
            for i in range(n)]


def test_batched_draws_follow_the_filtered_softmax():
    """8 rows x 500 steps at T=0.7 with top_p 0.75: the frequencies match numpy's softmax of
    the logits / T over the smallest set of tokens holding 75% of the mass (the first
    three here: 0.4 + 0.25 + 0.15), within 4 standard errors."""
    samplers = _samplers(8, temperature=0.7, top_p=0.75)
    logits = mx.array(np.tile(LOGITS, (8, 1)))
    counts = np.zeros(len(LOGITS))
    for _ in range(500):
        tokens, _, _ = sample_rows(samplers, logits)
        counts += np.bincount(np.array(tokens), minlength=len(LOGITS))
    p = np.exp(LOGITS[:3] / 0.7)
    p /= p.sum()
    freq = counts / counts.sum()
    assert counts[3:].sum() == 0
    se = np.sqrt(p * (1 - p) / counts.sum())
    assert np.all(np.abs(freq[:3] - p) < 4 * se), (freq, p)


def test_a_seeded_row_draws_the_same_alone_and_in_a_batch():
    alone = _samplers(3, temperature=1.0)
    together = _samplers(3, temperature=1.0)
    logits = mx.array(np.tile(LOGITS, (3, 1)))
    for _ in range(20):
        got = np.array(sample_rows(together, logits)[0]).tolist()
        assert got == [int(s.sample(logits[i:i + 1])[0].item()) for i, s in enumerate(alone)]
