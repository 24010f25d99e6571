"""Test-time compute in the engine: thinking budgets (the closing text forced once the
budget is spent) and n choices of one prompt that run its prefill once.

References are independent: mlx-lm's generate_step, greedy, on the prompt alone; after a
forced closing text, on the prompt plus everything written so far (what the model would do
had it written the closing text itself). Markers are plain token ids of the tiny models'
vocabulary: the engine knows thinking by ids only."""

from __future__ import annotations

import pytest
from runtime_helpers import drain_concurrently, reference_tokens, tiny_models  # noqa: F401

from mlxdist.runtime.api import GenerationRequest, SamplingParams, Thinking
from mlxdist.runtime.config import EngineConfig
from mlxdist.runtime.engine import open_engine
from mlxdist.runtime.thinking import ThinkState, resume

PROMPT = list(b"Think about 12 + 30, then answer:")
CLOSE = (60, 47, 116)  # "</t" in the tiny byte vocabulary: three tokens


def _events(eng, req):
    return [ev for ev in eng.submit(req) if ev.token is not None]


@pytest.mark.parametrize("ranks", [1, 2])
def test_budget_forces_the_closing_text_then_the_answer_goes_on(tiny_models, ranks):
    """Three rows at once with budgets 0, 4 and none (the prompt opened the thinking): up to
    its budget each row equals the unbudgeted run, then come exactly the closing tokens,
    then what mlx-lm writes after prompt + thinking + closing text. Tokens up to the closing
    text are marked as thinking, none after."""
    path = tiny_models["llama"]
    n = 14
    free = reference_tokens(path, PROMPT, n)
    split = [3, 3] if ranks == 2 else None
    with open_engine(path, EngineConfig(max_concurrent=8), ranks=ranks, split=split) as eng:
        reqs = [GenerationRequest(tuple(PROMPT), n, thinking=Thinking((), CLOSE, inside=True, budget=b))
                for b in (0, 4, None)]
        handles = [eng.submit(r) for r in reqs]
        outs = drain_concurrently(handles)
        flagged = [[ev.thinking for ev in _events(eng, r)] for r in reqs]  # the same requests again
        assert eng.stats().get("forced_tokens", 0) >= 2 * len(CLOSE)
    for budget, out, flags in zip((0, 4), outs, flagged):
        head = free[:budget] + list(CLOSE)
        assert out[:len(head)] == head
        assert out[len(head):] == reference_tokens(path, PROMPT + head, n - len(head))
        assert flags == [True] * len(head) + [False] * (n - len(head))
    assert outs[2] == free  # no budget: nothing forced
    if _find(free, CLOSE) is None:
        assert flagged[2] == [True] * n


def _settled(eng, done, timeout: float = 30.0) -> dict:
    """The engine's counters once `done` holds: rank 0 sends them with each request's end,
    which may come just after its last token."""
    import time

    deadline = time.monotonic() + timeout
    while not done(stats := eng.stats()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return stats


def _find(tokens: list[int], part: tuple[int, ...], start: int = 0) -> int | None:
    for i in range(start, len(tokens) - len(part) + 1):
        if tuple(tokens[i:i + len(part)]) == part:
            return i
    return None


def test_model_opens_its_thinking_and_closes_it_itself(tiny_models):
    """Markers taken from the model's own greedy output: it 'opens' with its first token and
    'closes' with its tokens 6..7; with no budget (or a large one) nothing is forced and the
    flags cover the thinking only; with budget 2 the closing text follows two tokens of
    thinking."""
    path = tiny_models["llama"]
    n = 16
    free = reference_tokens(path, PROMPT, n)
    open_, close = (free[0],), tuple(free[6:8])
    end = _find(free, close, 1) + 2  # where the thinking ends (it may close before 8)
    with open_engine(path, EngineConfig(max_concurrent=4), ranks=1) as eng:
        big = _events(eng, GenerationRequest(tuple(PROMPT), n, thinking=Thinking(open_, close, budget=100)))
        small = _events(eng, GenerationRequest(tuple(PROMPT), n, thinking=Thinking(open_, close, budget=2)))
    assert [e.token for e in big] == free
    assert [e.thinking for e in big] == [True] * end + [False] * (n - end)
    begun = 1 if free[2] == close[0] else 0  # a closing text the model began is finished, not restarted
    head = free[:3] + list(close[begun:])
    assert [e.token for e in small][:len(head)] == head
    assert [e.token for e in small][len(head):] == reference_tokens(path, PROMPT + head, n - len(head))


@pytest.mark.parametrize("ranks", [1, 2])
def test_n_choices_run_their_prompt_once(tiny_models, ranks):
    """Four seeded choices of one long prompt at once: each draws exactly the tokens it draws
    alone, the prompt ran once (the other three copied it), and greedy copies equal mlx-lm."""
    path = tiny_models["llama"]
    prompt = PROMPT * 6
    split = [3, 3] if ranks == 2 else None
    params = [SamplingParams(temperature=0.9, seed=10 + i) for i in range(4)]
    with open_engine(path, EngineConfig(max_concurrent=8), ranks=ranks, split=split) as eng:
        together = drain_concurrently([eng.submit(GenerationRequest(tuple(prompt), 10, p)) for p in params])
        stats = _settled(eng, lambda st: st.get("prefills", 0) + st.get("prefix_shared", 0) >= 4)
        greedy = drain_concurrently([eng.submit(GenerationRequest(tuple(prompt), 10)) for _ in range(3)])
        alone = [eng.submit(GenerationRequest(tuple(prompt), 10, p)).tokens() for p in params]
    assert together == alone
    assert stats.get("prefills", 0) == 1
    assert stats.get("prefix_shared", 0) == 3
    assert stats.get("shared_tokens", 0) == 3 * (len(prompt) - 1)
    assert greedy == [reference_tokens(path, prompt, 10)] * 3


def test_think_state_by_hand():
    """The rules, token by token, against hand-written expectations."""
    s = ThinkState.start(Thinking((1,), (8, 9), budget=2))
    assert [s.take(t) for t in (1, 5, 8, 7, 7, 3)] == [(1, True), (5, True), (8, True), (9, True), (7, False),
                                                       (3, False)]
    # a closing text the model began before the budget ran out is finished, not restarted
    s = ThinkState.start(Thinking((), (8, 9), inside=True, budget=1))
    assert [s.take(t) for t in (8, 4, 4)] == [(8, True), (9, True), (4, False)]
    # no thinking opened: nothing is counted or forced
    s = ThinkState.start(Thinking((1,), (8, 9), budget=0))
    assert [s.take(t) for t in (2, 1, 5)] == [(2, False), (1, False), (5, False)]
    # replayed after a restart: what is left of the budget
    spec = Thinking((1,), (8, 9), budget=5)
    assert resume(spec, [1, 4, 4]) == Thinking((1,), (8, 9), True, 3)
    assert resume(spec, [1, 4, 8, 9, 6]) is None
    assert resume(Thinking((), (8, 9), True, 1), [4, 8]) == Thinking((), (9,), True, 0)
