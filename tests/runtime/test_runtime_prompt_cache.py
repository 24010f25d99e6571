"""Prefix caching (`prompt_cache=N`): a finished request's caches stay on every rank, and a
later prompt that starts the same way is prefilled only past the shared prefix. The
reference is mlx-lm itself doing the same: generate_step on the first prompt with a
prompt cache, the cache trimmed to the shared prefix, generate_step on the rest."""

from __future__ import annotations

import re

import pytest
from runtime_helpers import reference_tokens, tiny_models  # noqa: F401 (fixture)

from mlxdist.runtime.engine import open_engine

FIRST = list(b"Pipelines keep every stage busy.")
N1, N2 = 6, 8


def reference_after_prefix(path, first: list[int], second: list[int], keep: int) -> tuple[list[int], list[int]]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    model, _ = load(str(path))
    cache = make_prompt_cache(model)
    one = [t for t, _ in generate_step(mx.array(first), model, max_tokens=N1, prompt_cache=cache)]
    trim_prompt_cache(cache, cache[0].offset - keep)
    two = [t for t, _ in generate_step(mx.array(second[keep:]), model, max_tokens=N2, prompt_cache=cache)]
    return one, two


def _reused(eng) -> int:
    if hasattr(eng._backend, "coord"):  # one rank, in this process
        return int(eng._backend.coord.stats.get("reused_tokens", 0))
    m = re.search(r"'reused_tokens': (\d+)", (eng._backend.launcher.dir / "rank0.log").read_text())
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize("ranks,opts", [(1, {}), (2, {}), (3, {"handoff": "collective"})])
def test_next_turn_reuses_the_shared_prefix(tiny_models, ranks, opts):
    path = tiny_models["deepseek_v3"]
    first_ref = reference_tokens(path, FIRST, N1)
    second = FIRST + first_ref[:3] + list(b" and then?")  # a chat's next turn
    keep = len(FIRST) + 3
    want_first, want_second = reference_after_prefix(path, FIRST, second, keep)
    other = list(b"an unrelated prompt")
    other_next = other + list(b"!")
    want_other_next = reference_after_prefix(path, other, other_next, len(other))[1]
    with open_engine(path, ranks=ranks, prompt_cache=1, max_concurrent=1, **opts) as eng:
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


def test_off_by_default(tiny_models):
    path = tiny_models["llama"]
    with open_engine(path) as eng:
        eng.generate(FIRST, max_tokens=2)
        eng.generate(FIRST, max_tokens=2)
        assert _reused(eng) == 0
