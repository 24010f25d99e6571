"""Prefix caching (`prompt_cache=N`): a finished request's caches stay on every rank, and a
later prompt that starts the same way is prefilled only past the shared prefix. The
reference is mlx-lm itself doing the same: generate_step on the first prompt with a
prompt cache, the cache trimmed to the shared prefix, generate_step on the rest
(`reference_chain`)."""

from __future__ import annotations

import pytest
from runtime_helpers import reference_tokens, tiny_models  # noqa: F401 (fixture)

from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine

FIRST = list(b"Pipelines keep every stage busy.")
N1, N2 = 6, 8


def reference_chain(path, steps: list[tuple[list[int], int, int]]) -> list[list[int]]:
    """mlx-lm with one prompt cache through `steps` of (prompt, keep, max_tokens): before
    each, the cache is trimmed to `keep` positions and generate_step continues from
    prompt[keep:]. So every cached position is computed in the same chunks as ours."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    model, _ = load(str(path))
    cache = make_prompt_cache(model)
    out = []
    for prompt, keep, n in steps:
        trim_prompt_cache(cache, cache[0].offset - keep)
        out.append([t for t, _ in generate_step(mx.array(prompt[keep:]), model, max_tokens=n, prompt_cache=cache)])
    return out


def _reused(eng) -> int:
    """Prompt tokens taken from retained caches (rank 0's counter, as /metrics shows it)."""
    return int(eng.stats().get("reused_tokens", 0))


@pytest.mark.parametrize("ranks,handoff", [(1, "messages"), (2, "messages"), (3, "collective")])
def test_next_turn_reuses_the_shared_prefix(tiny_models, ranks, handoff):
    path = tiny_models["deepseek_v3"]
    first_ref = reference_tokens(path, FIRST, N1)
    second = FIRST + first_ref[:3] + list(b" and then?")  # a chat's next turn
    keep = len(FIRST) + 3
    want_first, want_second = reference_chain(path, [(FIRST, 0, N1), (second, keep, N2)])
    other = list(b"an unrelated prompt")
    other_next = other + list(b"!")
    want_other_next = reference_chain(path, [(other, 0, N2), (other_next, len(other), N2)])[1]
    config = EngineConfig(prompt_cache=1, max_concurrent=1, handoff=handoff)
    with open_engine(path, config, ranks=ranks) as eng:
        assert eng.generate(FIRST, max_tokens=N1) == want_first
        assert eng.generate(second, max_tokens=N2) == want_second
        # one retained sequence at most: `other` (nothing shared) takes the free slot, and
        # the second request's caches are evicted (FREE on every rank)
        assert eng.generate(other, max_tokens=N2) == reference_tokens(path, other, N2)
        assert eng.generate(other_next, max_tokens=N2) == want_other_next
        # the evicted slot serves a fresh prefill, exactly
        assert eng.generate(second, max_tokens=N2) == reference_tokens(path, second, N2)
        assert eng.failure is None
    assert _reused(eng) == keep + len(other)


def test_one_prefix_serves_concurrent_requests(tiny_models):
    """Two requests at once that both start with a retained prompt each get a copy of its
    caches; the source stays (a system prompt serves every request), none disturbs another."""
    from runtime_helpers import drain_concurrently

    from mlxdist.runtime.api import GenerationRequest

    path = tiny_models["llama"]
    turns = [FIRST + list(b" one"), FIRST + list(b" two")]
    want = [reference_chain(path, [(FIRST, 0, N1), (t, len(FIRST), N2)])[1] for t in turns]
    again = reference_chain(path, [(FIRST, 0, N1), (turns[0], len(FIRST), N2),
                                   (turns[0], len(turns[0]) - 1, N2)])[2]
    with open_engine(path, EngineConfig(prompt_cache=2, max_concurrent=2), ranks=2, split=[3, 3]) as eng:
        eng.generate(FIRST, max_tokens=N1)
        handles = [eng.submit(GenerationRequest(tuple(t), N2)) for t in turns]
        assert drain_concurrently(handles) == want
        assert eng.generate(turns[0], max_tokens=N2) == again  # its own finished turn: the longest prefix
        assert eng.failure is None
    assert _reused(eng) == 2 * len(FIRST) + len(turns[0]) - 1


def test_retained_prefixes_bookkeeping():
    """Longest shared prefix wins, never the prompt's last token; hits become most recently
    used; eviction takes the least recently used, sparing pinned sources."""
    from mlxdist.runtime.prefix_cache import RetainedPrefixes

    r = RetainedPrefixes()
    r.add(3, [1, 2, 3, 4])
    r.add(5, [1, 2, 9])
    assert r.find([1, 2, 3, 4]) == (3, 3)  # the last token must be fed: 3 of 4
    assert r.find([1, 2, 9, 9]) == (5, 3)
    assert r.find([7, 1]) == (0, 0)
    assert r.find([1]) == (0, 0)
    assert list(r) == [3, 5]  # 5 was used last
    assert r.victims(1, pinned=set()) == [3]
    assert r.victims(1, pinned={3}) == [5]
    assert r.victims(0, pinned={3}) == [5]
    assert r.victims(2, pinned=set()) == []


def test_off_by_default(tiny_models):
    path = tiny_models["llama"]
    with open_engine(path) as eng:
        eng.generate(FIRST, max_tokens=2)
        eng.generate(FIRST, max_tokens=2)
        assert _reused(eng) == 0
