"""Test-time compute, the pure parts: answer extraction, vote tables, when a vote is
decided, the judge's and the PRM's probabilities, and the three search strategies driven
by scripted `generate` / `score` callables. Every expectation is computed by hand."""

from __future__ import annotations

import asyncio
import math

import pytest

from mlxdist.runtime.api import TokenEvent
from mlxdist.server.answers import Vote, check_extract, decided, extract_answer, is_final, normalize, vote
from mlxdist.server.search import Completion, SearchConfig, beam_search, best_of_n, dvts, run_search
from mlxdist.server.verifier import (PrmFormat, first_token_choices, judge_messages, judge_probability,
                                     prm_probability, prm_text)

# ---- extraction --------------------------------------------------------------------------

LAST_NUMBER = [
    ("The answer is 42.", "42"),
    ("3 + 4 = 7, then 7 * 6 = 42.0", "42"),
    ("so +42", "42"),
    ("Total: 1,234,567 apples", "1234567"),
    ("It costs $1,000.", "1000"),
    ("x = -3", "-3"),
    ("5 - 3", "3"),
    ("from 2023-2024", "2024"),
    ("half is 1/2", "0.5"),
    ("2/4 of it", "0.5"),
    ("6/3", "2"),
    ("one third: 1/3", "1/3"),
    ("-3/4", "-0.75"),
    ("0.50", "0.5"),
    ("about .5", "0.5"),
    ("-0.0", "0"),
    ("the list 1,2,3", "3"),
    ("no numbers here", None),
    ("<think>maybe 41 or 40</think>The answer is 42", "42"),
    ("<think>it is 41</think>no idea", None),  # a number only in the thinking is no answer
    ("<think>still thinking about 41", None),  # never closed: no answer part at all
]


@pytest.mark.parametrize("text,want", LAST_NUMBER)
def test_last_number(text, want):
    assert extract_answer(text, "last_number") == want


def test_thinking_left_open_by_the_prompt_is_stripped():
    assert extract_answer("I ponder 41.\n</think>\n\nAnswer: 42", "last_number", starts_inside=True) == "42"
    assert extract_answer("I ponder 41.", "last_number", starts_inside=True) is None


BOXED = [
    (r"so \boxed{42}", "42"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{x^{2}+1}", "x^{2}+1"),
    (r"\boxed{3} and then \boxed{4", "3"),  # the last box never closed: not an answer yet
    (r"\boxed{ 42.0 }", "42"),
    (r"\boxed{1,000}", "1000"),
    (r"\fbox{7}", "7"),
    (r"\boxed{\text{Paris}}", r"\text{Paris}"),
    (r"<think>\boxed{1}</think>so \boxed{2}", "2"),
    (r"<think>\boxed{1}</think>none", None),
    ("the answer is 42", None),
]


@pytest.mark.parametrize("text,want", BOXED)
def test_boxed(text, want):
    assert extract_answer(text, "boxed") == want


REGEX = [
    (r"regex:Answer: (\w+)", "Answer: foo, then Answer: bar", "bar"),
    (r"regex:\b[A-D]\b", "options A or C", "C"),
    (r"regex:answer is (-?\d+)", "answer is 41. Final answer is 42.0", "42"),
    (r"regex:x(\d)?", "x", None),  # the group took no part in the match
    (r"regex:ans=(\d+)", "<think>ans=1</think>ans=2", "2"),
    (r"regex:ans=(\d+)", "nothing", None),
]


@pytest.mark.parametrize("how,text,want", REGEX)
def test_regex(how, text, want):
    assert extract_answer(text, how) == want


def test_check_extract():
    for ok in ("boxed", "last_number", "regex:a(b)"):
        check_extract(ok)
    for bad, says in (("regex:", "needs a pattern"), ("regex:(", "does not compile"), ("median", "unknown")):
        with pytest.raises(ValueError, match=says):
            check_extract(bad)


def test_normalize():
    assert normalize("$42$") == "42"
    assert normalize(r"\frac{3}{4}") == "0.75"
    assert normalize(r"-\frac{1}{3}") == "-1/3"
    assert normalize("  Paris   France ") == "Paris France"
    assert normalize("1/0") == "1/0"
    assert normalize("12.") == "12"


def test_is_final():
    assert not is_final("Step 1: 3 + 4 = 7\n\n", "last_number")
    assert is_final("So the final answer is 7.", "last_number")
    assert is_final("Thus the answer is: 7\n\n", "last_number")
    assert not is_final("<think>the answer is 7</think>", "last_number")
    assert is_final(r"\boxed{7}", "regex:foo")
    assert is_final("foo", "regex:foo")
    assert not is_final("The answer is 7", "boxed")
    assert is_final(r"so \boxed{7}", "boxed")


# ---- votes -------------------------------------------------------------------------------

def test_vote_unweighted():
    table = vote(["42", "41", "42", None, "41", "7"])
    # 42 and 41 tie on two votes: 42's first candidate (0) comes before 41's (1)
    assert table == [Vote("42", 2, 2.0, (0, 2)), Vote("41", 2, 2.0, (1, 4)), Vote("7", 1, 1.0, (5,)),
                     Vote(None, 1, 1.0, (3,))]


def test_vote_weighted():
    table = vote(["a", "b", "a", "b", None], [0.2, 0.5, 0.2, 0.1, 0.9])
    assert [(v.answer, v.count, v.indices) for v in table] == [("b", 2, (1, 3)), ("a", 2, (0, 2)), (None, 1, (4,))]
    assert [v.weight for v in table] == pytest.approx([0.6, 0.4, 0.9])  # None is last even with the most weight


def test_vote_ties_and_edges():
    assert [v.answer for v in vote(["x", "y"], [0.5, 0.5])] == ["x", "y"]  # equal weight: earlier first
    assert [v.answer for v in vote(["x", "y", "y"], [1.0, 0.5, 0.5])] == ["y", "x"]  # equal weight: more votes
    assert vote([None, None]) == [Vote(None, 2, 2.0, (0, 1))]
    assert vote([]) == []
    with pytest.raises(ValueError):
        vote(["a"], [1.0, 2.0])


@pytest.mark.parametrize("counts,remaining,want", [
    ([3, 1], 1, True),  # 3 > 1 + 1
    ([3, 2], 1, False),  # the last one could make it 3:3, and a tie may go either way
    ([2], 1, True),  # 2 > 0 + 1: a new answer reaches 1 at most
    ([2], 2, False),
    ([4, 1, 1], 2, True),
    ([1, 4, 1], 3, False),  # any order; 4 > 1 + 3 fails
    ([5], 4, True),
    ([1, 1], 0, True),  # nothing remains: final, the tie-break decides
    ([], 3, False),
    ([], 0, True),
])
def test_decided(counts, remaining, want):
    assert decided(counts, remaining) is want


# ---- verifier probabilities --------------------------------------------------------------

def test_judge_probability():
    top = [("Yes", math.log(0.6)), ("No", math.log(0.2)), (" yes", math.log(0.1)), ("Maybe", math.log(0.05))]
    assert judge_probability(top) == pytest.approx(0.7 / 0.9)
    assert judge_probability([("YES\n", math.log(0.3))]) == pytest.approx(1.0)
    assert judge_probability([("No", math.log(0.5)), (" no", math.log(0.1))]) == 0.0
    assert judge_probability([("yes.", math.log(0.5)), ("No", math.log(0.25))]) == 0.0  # "yes." is not "yes"
    assert judge_probability([("A", -1.0)]) == 0.5 and judge_probability([]) == 0.5


def test_prm_text_and_probability():
    text = prm_text("What is 1+1?", "Step 1: 1+1=2\n\nThe answer is: 2\n\n")
    assert text == "What is 1+1? Step 1: 1+1=2 ки\nThe answer is: 2 ки"
    fmt = PrmFormat(tag=" <step>", good="Good", bad="Bad", join=" ")
    assert prm_text("Q", "a\n\nb", fmt) == "Q a <step> b <step>"
    assert prm_probability([("+", math.log(0.8)), ("-", math.log(0.1)), ("ки", math.log(0.05))]) == \
        pytest.approx(0.8 / 0.9)
    assert prm_probability([(" Good", math.log(0.2)), ("Bad", math.log(0.6)), ("+", 0.0)], fmt) == pytest.approx(0.25)


def test_first_token_choices_and_judge_messages():
    event = TokenEvent(3, "c", -3.0, top_logprobs=((1, -0.1), (2, -2.0)))
    assert first_token_choices(event, lambda t: "_abc"[t]) == [("a", -0.1), ("b", -2.0), ("c", -3.0)]
    inside = TokenEvent(1, "a", -0.1, top_logprobs=((1, -0.1),))
    assert first_token_choices(inside, lambda t: "_abc"[t]) == [("a", -0.1)]
    system, user = judge_messages("What is 2+2?", "2+2 = 4")
    assert system["role"] == "system" and user["role"] == "user"
    assert "What is 2+2?" in user["content"] and "2+2 = 4" in user["content"] and "Yes or No" in user["content"]


# ---- search strategies -------------------------------------------------------------------

class Script:
    """`generate` answers call c with the c-th list of completions; `score` looks texts up."""

    def __init__(self, rounds: list[list[Completion]], scores: dict[str, float]) -> None:
        self.rounds, self.scores = rounds, scores
        self.calls: list[tuple[list[str], int, str | None, int, list[int]]] = []
        self.scored: list[list[str]] = []

    async def generate(self, prefixes, n_each, stop, max_tokens, seeds):
        self.calls.append((list(prefixes), n_each, stop, max_tokens, list(seeds)))
        out = self.rounds[len(self.calls) - 1]
        assert len(out) == len(prefixes) * n_each == len(seeds)
        return out

    async def score(self, texts):
        self.scored.append(list(texts))
        return [self.scores[t] for t in texts]


def step(text: str, tokens: int = 3) -> Completion:
    """A step that ended at the blank line."""
    return Completion(text, tokens, "stop", hit_stop=True)


def end(text: str, tokens: int = 3, why: str = "stop") -> Completion:
    """A step that ended the answer (EOS or length)."""
    return Completion(text, tokens, why)


def test_best_of_n_weighted_majority():
    s = Script([[end("x=3. The answer is 42", 5), end("The answer is 41", 4), end("So 42.0", 2), end("no idea", 1)]],
               {"x=3. The answer is 42": 0.3, "The answer is 41": 0.9, "So 42.0": 0.35, "no idea": 0.95})
    r = asyncio.run(best_of_n(SearchConfig(n=4, seed=10, max_tokens=99), s.generate, s.score))
    assert s.calls == [([""], 4, None, 99, [10, 11, 12, 13])]
    # 42 has two votes but 0.3 + 0.35 = 0.65 < 0.9 of 41; "no idea" (0.95) has no answer
    assert [(v.answer, v.count) for v in r.votes] == [("41", 1), ("42", 2), (None, 1)]
    assert [v.weight for v in r.votes] == pytest.approx([0.9, 0.65, 0.95])
    assert (r.answer, r.chosen, r.best, r.steps, r.generated_tokens, r.verifier_calls) == ("41", 1, 3, 1, 12, 4)
    assert [x.answer for x in r.solutions] == ["42", "41", "42", None]


def test_best_of_n_picks_the_best_of_the_majority_not_the_best():
    s = Script([[end("7"), end("7"), end("8")]], {})

    async def score(texts):  # by position: the two "7" texts score differently
        return [0.5, 0.4, 0.8]

    r = asyncio.run(best_of_n(SearchConfig(n=3), s.generate, score))
    # 7: 0.5 + 0.4 = 0.9 beats 8: 0.8; within 7 the first (0.5) is chosen; the best is 8
    assert (r.answer, r.chosen, r.best) == ("7", 0, 2)


def test_beam_search_keeps_the_best_and_retires_finished_beams():
    rounds = [
        [step("A1"), step("B1"), step("C1"), step("D1")],  # from the prompt: beam_width x n = 2 x 2
        [step("B2"), end("The answer is 5"), step("D2"), end("D2x", why="length")],
        [step("So the final answer is 6."), step("D3")],
        [end("The answer is 5"), end("The answer is 6")],
    ]
    scores = {"A1\n\n": 0.2, "B1\n\n": 0.9, "C1\n\n": 0.6, "D1\n\n": 0.9,
              "B1\n\nB2\n\n": 0.5, "B1\n\nThe answer is 5": 0.7, "D1\n\nD2\n\n": 0.8, "D1\n\nD2x": 0.1,
              "D1\n\nD2\n\nSo the final answer is 6.\n\n": 0.6, "D1\n\nD2\n\nD3\n\n": 0.65,
              "D1\n\nD2\n\nD3\n\nThe answer is 5": 0.2, "D1\n\nD2\n\nD3\n\nThe answer is 6": 0.3}
    s = Script(rounds, scores)
    r = asyncio.run(beam_search(SearchConfig("beam", n=2, beam_width=2, max_steps=10, seed=3, max_tokens=50),
                                s.generate, s.score))
    # round 1 keeps B1 and D1 (0.9 each; C1 0.6 and A1 0.2 go); round 2 keeps D2 (0.8) and
    # "The answer is 5" (0.7), which finishes: one place left; round 3 keeps D3 (0.65) over
    # the final "6" (0.6); round 4 keeps "The answer is 6" (0.3), which finishes
    # each step's cap is what its path has left of max_tokens (3 tokens a step here)
    assert [c[:4] for c in s.calls] == [([""], 4, "\n\n", [50]), (["B1\n\n", "D1\n\n"], 2, "\n\n", [47, 47]),
                                        (["D1\n\nD2\n\n"], 2, "\n\n", [44]),
                                        (["D1\n\nD2\n\nD3\n\n"], 2, "\n\n", [41])]
    assert [(x.text, x.answer, x.finish_reason, x.tokens) for x in r.solutions] == [
        ("B1\n\nThe answer is 5", "5", "stop", 6), ("D1\n\nD2\n\nD3\n\nThe answer is 6", "6", "stop", 12)]
    assert [x.score for x in r.solutions] == [0.7, 0.3]
    assert (r.answer, r.chosen, r.best, r.steps, r.generated_tokens, r.verifier_calls) == ("5", 0, 0, 4, 36, 12)
    seeds = [x for c in s.calls for x in c[4]]
    assert len(set(seeds)) == len(seeds) == 12
    again = Script(rounds, scores)
    asyncio.run(beam_search(SearchConfig("beam", n=2, beam_width=2, max_steps=10, seed=3), again.generate, again.score))
    assert [c[4] for c in again.calls] == [c[4] for c in s.calls]  # deterministic
    other = Script(rounds, scores)
    asyncio.run(beam_search(SearchConfig("beam", n=2, beam_width=2, max_steps=10, seed=4), other.generate, other.score))
    assert other.calls[0][4] != s.calls[0][4]


def test_beam_search_stops_at_max_steps():
    s = Script([[step("A"), step("B")]], {"A\n\n": 0.4, "B\n\n": 0.6})
    r = asyncio.run(beam_search(SearchConfig("beam", n=1, beam_width=2, max_steps=1), s.generate, s.score))
    # both kept, both still open after the one step allowed: cut off, best first
    assert [(x.text, x.finish_reason, x.score) for x in r.solutions] == [("B", "length", 0.6), ("A", "length", 0.4)]
    assert (r.answer, r.chosen, r.steps) == (None, 0, 1)


def test_step_search_paths_end_when_max_tokens_is_spent():
    """max_tokens bounds a path in all: a step that reaches it ends the path, cut off by
    length, though it ended at a blank line; the other path's next step gets what is left."""
    rounds = [[step("A", 6), step("B", 10)], [end("The answer is 2", 2)]]
    scores = {"A\n\n": 0.5, "B\n\n": 0.6, "A\n\nThe answer is 2": 0.7}
    s = Script(rounds, scores)
    r = asyncio.run(beam_search(SearchConfig("beam", n=1, beam_width=2, max_steps=10, max_tokens=10),
                                s.generate, s.score))
    assert [c[3] for c in s.calls] == [[10], [4]]
    assert [(x.text, x.finish_reason, x.tokens) for x in r.solutions] == [("B", "length", 10),
                                                                         ("A\n\nThe answer is 2", "stop", 8)]
    d = Script([[step("P", 7), step("Q", 3)], [end("R", 2), end("S", 1)]],
               {"P\n\n": 0.1, "Q\n\n": 0.9, "Q\n\nR": 0.5, "Q\n\nS": 0.4})
    asyncio.run(dvts(SearchConfig("dvts", n=2, beam_width=1, max_steps=10, max_tokens=5), d.generate, d.score))
    assert [c[3] for c in d.calls] == [[5], [2]]


def test_dvts_subtrees_grow_greedily_and_vote():
    rounds = [
        [step("P"), step("Q"), step("R"), step("S")],  # subtree 0: P, Q; subtree 1: R, S
        [end("The answer is 3"), step("Q2"), step("R2"), end("The answer is 4", why="length")],
        [end("The answer is 4"), end("The answer is 3")],
    ]
    scores = {"P\n\n": 0.3, "Q\n\n": 0.7, "R\n\n": 0.9, "S\n\n": 0.9,
              "Q\n\nThe answer is 3": 0.4, "Q\n\nQ2\n\n": 0.6, "R\n\nR2\n\n": 0.5, "R\n\nThe answer is 4": 0.8,
              "Q\n\nQ2\n\nThe answer is 4": 0.3, "Q\n\nQ2\n\nThe answer is 3": 0.2}
    s = Script(rounds, scores)
    r = asyncio.run(dvts(SearchConfig("dvts", n=2, beam_width=2, max_steps=5, seed=1), s.generate, s.score))
    # subtree 0: Q (0.7 > 0.3), then Q2 (0.6 > 0.4), then "4" (0.3 > 0.2); subtree 1: R (tie
    # 0.9: the earlier), then "The answer is 4" (0.8 > 0.5), done after two steps
    assert [c[:3] for c in s.calls] == [(["", ""], 2, "\n\n"), (["Q\n\n", "R\n\n"], 2, "\n\n"),
                                        (["Q\n\nQ2\n\n"], 2, "\n\n")]
    assert [(x.text, x.finish_reason) for x in r.solutions] == [("Q\n\nQ2\n\nThe answer is 4", "stop"),
                                                                ("R\n\nThe answer is 4", "length")]
    assert [(v.answer, v.count) for v in r.votes] == [("4", 2)] and r.votes[0].weight == pytest.approx(1.1)
    assert (r.answer, r.chosen, r.best, r.steps, r.verifier_calls) == ("4", 1, 1, 3, 10)
    seeds = [x for c in s.calls for x in c[4]]
    assert len(set(seeds)) == len(seeds) == 10  # the two subtrees sample differently from the same prompt


def test_run_search_dispatch():
    s = Script([[end("1")]], {"1": 1.0})
    assert asyncio.run(run_search(SearchConfig("best_of_n", n=1), s.generate, s.score)).answer == "1"
    with pytest.raises(ValueError, match="unknown strategy"):
        asyncio.run(run_search(SearchConfig("mcts"), s.generate, s.score))
