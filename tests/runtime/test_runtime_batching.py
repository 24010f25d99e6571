"""Continuous batching: decoding rows share one forward pass per step, on one rank, across a
pipeline, in lock-step runs and expert parallel; every row stays exact.

References are independent: greedy rows against mlx-lm's generate_step on the prompt alone
(float32 tiny models), seeded rows against the same request decoded alone."""

from __future__ import annotations

import threading

import pytest
from runtime_helpers import drain_concurrently, reference_top_logprobs, reference_tokens, tiny_models  # noqa: F401

from mlxdist.runtime.api import GenerationRequest, SamplingParams
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine

PROMPTS = [list(f"row {i}: {'abcdefghij' * (i % 3)} the end".encode()) for i in range(8)]
LENGTHS = [6, 14, 9, 20, 3, 11, 16, 8]  # rows leave at different steps
SAMPLED = [
    SamplingParams(temperature=0.8, top_k=40, seed=3),
    SamplingParams(temperature=1.1, top_p=0.9, seed=4),
    SamplingParams(temperature=0.7, min_p=0.05, repetition_penalty=1.2, seed=5),
]


def _widest(eng) -> float:
    return eng.stats().get("widest", 0)


@pytest.mark.parametrize("arch,ranks,split,handoff", [
    ("llama", 1, None, "messages"),
    ("llama_q4", 1, None, "messages"),  # 4-bit weights (float32 compute on the CPU)
    ("qwen3_moe", 1, None, "messages"),
    ("llama", 2, [3, 3], "messages"),
    ("deepseek_v3", 3, [1, 3, 2], "messages"),
    ("llama", 2, [2, 4], "collective"),
])
def test_batched_rows_match_each_prompt_alone(tiny_models, arch, ranks, split, handoff):
    """Eight requests at once (on several ranks: prompt batches merged and rows MOVEd to
    even the groups out), each equal to its prompt alone in mlx-lm."""
    path = tiny_models[arch]
    refs = [reference_tokens(path, p, n) for p, n in zip(PROMPTS, LENGTHS)]
    with open_engine(path, EngineConfig(max_concurrent=8, handoff=handoff), ranks=ranks, split=split) as eng:
        handles = [eng.submit(GenerationRequest(tuple(p), n)) for p, n in zip(PROMPTS, LENGTHS)]
        assert drain_concurrently(handles) == refs
        assert _widest(eng) >= 2  # rows did share forwards
        if handoff == "collective":
            assert eng.stats().get("runs", 0) >= 1  # and lock-step runs carried whole groups


@pytest.mark.parametrize("ranks", [1, 2])
def test_rows_join_and_leave_between_steps(tiny_models, ranks):
    """Long rows decode (one per stage's group) while others join mid-way (prefilled
    together in a group of their own, then merged into a running one) and leave at their
    own lengths; then a fresh one joins. Every row equals its prompt alone in mlx-lm."""
    path = tiny_models["llama"]
    longs = [PROMPTS[0], PROMPTS[6]][:ranks]
    long_refs = [reference_tokens(path, p, 40) for p in longs]
    refs = [reference_tokens(path, p, n) for p, n in zip(PROMPTS[1:5], LENGTHS[1:5])]
    split = [3, 3] if ranks == 2 else None
    with open_engine(path, EngineConfig(max_concurrent=8), ranks=ranks, split=split) as eng:
        running, got = [], []
        for p in longs:  # one after the other: each its own group
            running.append(iter(eng.submit(GenerationRequest(tuple(p), 40))))
            got.append([next(running[-1]).token for _ in range(5)])
        joined = [eng.submit(GenerationRequest(tuple(p), n)) for p, n in zip(PROMPTS[1:5], LENGTHS[1:5])]
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("rows", drain_concurrently(joined)))
        t.start()
        for g, r in zip(got, running):
            g += [ev.token for ev in r if ev.token is not None]
        t.join(60)
        assert got == long_refs
        assert out["rows"] == refs
        assert eng.generate(PROMPTS[5], max_tokens=LENGTHS[5]) == reference_tokens(path, PROMPTS[5], LENGTHS[5])
        # rows did share forwards; the newcomers, submitted together, almost always run as
        # a prompt batch that is then merged (`merges`), though a slow host may take one alone
        assert eng.stats().get("widest", 0) >= 3


@pytest.mark.parametrize("ranks", [1, 2])
def test_seeded_rows_same_alone_and_in_any_batch(tiny_models, ranks):
    """Each request keeps its own key and filters: alone, or among greedy and other sampled
    rows, it draws the same tokens."""
    path = tiny_models["llama"]
    split = [3, 3] if ranks == 2 else None
    with open_engine(path, EngineConfig(max_concurrent=8), ranks=ranks, split=split) as eng:
        alone = [eng.submit(GenerationRequest(tuple(PROMPTS[i]), 12, s)).tokens() for i, s in enumerate(SAMPLED)]
        reqs = [GenerationRequest(tuple(PROMPTS[i]), 12, s) for i, s in enumerate(SAMPLED)]
        reqs += [GenerationRequest(tuple(p), n) for p, n in zip(PROMPTS[3:], LENGTHS[3:])]
        for order in (reqs, reqs[::-1]):
            results = drain_concurrently([eng.submit(r) for r in order])
            if order is not reqs:
                results = results[::-1]
            assert results[:3] == alone
        assert _widest(eng) >= 4


def test_top_logprobs_per_row_in_a_batch(tiny_models):
    """Rows asking for top logprobs (different k) beside rows that do not: each gets its own,
    equal to mlx-lm's for its prompt alone."""
    path = tiny_models["llama"]
    want = {i: reference_top_logprobs(path, PROMPTS[i], 5, k) for i, k in ((0, 3), (2, 5))}
    with open_engine(path, EngineConfig(max_concurrent=8)) as eng:
        handles = {i: eng.submit(GenerationRequest(tuple(PROMPTS[i]), 5, logprobs=k))
                   for i, k in ((0, 3), (1, 0), (2, 5), (3, 0))}
        events = {}
        threads = [threading.Thread(target=lambda i=i, h=h: events.__setitem__(i, list(h))) for i, h in handles.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    for i, ref in want.items():
        assert len(events[i]) == 5
        for ev, steps in zip(events[i], ref):
            assert [j for j, _ in ev.top_logprobs] == [j for j, _ in steps]
            assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(ev.top_logprobs, steps))
            assert abs(ev.logprob - steps[0][1]) < 1e-4
    assert all(ev.top_logprobs == () for ev in events[1])


def test_prompt_chunks_interleave_with_decoding(tiny_models):
    """A long new prompt is prefilled a chunk at a time between the decoders' steps: the
    running row keeps getting tokens before the new one's first."""
    path = tiny_models["llama"]
    long_prompt = list(b"a long prompt " * 8)  # 112 tokens: 28 chunks of 4
    order: list[str] = []
    with open_engine(path, EngineConfig(max_concurrent=4, prefill_step=4)) as eng:
        running = eng.submit(GenerationRequest(tuple(PROMPTS[1]), 200))
        events = iter(running)
        next(events)
        newcomer = eng.submit(GenerationRequest(tuple(long_prompt), 3))
        reader = threading.Thread(target=lambda: [order.append("run") for _ in events])
        reader.start()
        for _ in newcomer:
            order.append("new")
        running.cancel()
        reader.join(60)
    assert order[:order.index("new")].count("run") >= 5


def test_prefix_copies_into_a_batch_row(tiny_models):
    """A retained prefix is copied into each of several concurrent rows."""
    path = tiny_models["llama"]
    first = PROMPTS[2]
    with open_engine(path, EngineConfig(max_concurrent=4, prompt_cache=2)) as eng:
        answer = eng.generate(first, max_tokens=6)
        follow = [first + answer + list(f" next {i}".encode()) for i in range(3)]
        refs = [reference_tokens(path, p, 7) for p in follow]
        assert drain_concurrently([eng.submit(GenerationRequest(tuple(p), 7)) for p in follow]) == refs
        assert eng.stats().get("reused_tokens", 0) >= 3 * len(first)
        assert _widest(eng) >= 2


@pytest.mark.parametrize("ranks", [2])
def test_expert_parallel_batches(tiny_models, ranks):
    path = tiny_models["deepseek_v3"]
    refs = [reference_tokens(path, p, n) for p, n in zip(PROMPTS[:4], LENGTHS[:4])]
    with open_engine(path, EngineConfig(expert_parallel=True, max_concurrent=4), ranks=ranks) as eng:
        handles = [eng.submit(GenerationRequest(tuple(p), n)) for p, n in zip(PROMPTS[:4], LENGTHS[:4])]
        assert drain_concurrently(handles) == refs
        assert _widest(eng) >= 2


def test_ranks_sharing_one_gpu_run_one_group(tiny_models, monkeypatch):
    """Local ranks on one device are told so (MLXDIST_SHARED_DEVICE, unless each has its own
    GPU); on a GPU rank 0 then runs one group. Forced here on the CPU (MLXDIST_GROUPS=1):
    two ranks, one group as wide as all eight rows, each row still its prompt alone."""
    from mlxdist.runtime.launcher import one_gpu_per_rank, shares_device

    assert shares_device([{}, {}]) and shares_device([{"CUDA_VISIBLE_DEVICES": "0"}] * 2)
    assert not shares_device([one_gpu_per_rank(2, "3,5")(r) for r in range(2)]) and not shares_device([{}])
    monkeypatch.setenv("MLXDIST_GROUPS", "1")
    path = tiny_models["llama"]
    refs = [reference_tokens(path, p, n) for p, n in zip(PROMPTS, LENGTHS)]
    with open_engine(path, EngineConfig(max_concurrent=8), ranks=2, split=[3, 3]) as eng:
        handles = [eng.submit(GenerationRequest(tuple(p), n)) for p, n in zip(PROMPTS, LENGTHS)]
        assert drain_concurrently(handles) == refs
        assert _widest(eng) >= 5 and not eng.stats().get("moves", 0)
