"""The task generator of the test-time-compute benchmark (tools/ttc_tasks.py): deterministic,
right answers, a checker that finds the last number. Pure Python, well under a second."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from ttc_tasks import (  # noqa: E402
    INSTRUCTION, build_prompt, extract_last_number, extract_numbers, generate, is_correct, messages,
)


def recompute(start: int, ops: tuple) -> int:
    """The answer from the structured form, written apart from the generator's own solve()."""
    value = start
    for op in ops:
        name, args = op[0], op[1:]
        if name == "add":
            value += args[0]
        elif name == "sub":
            value -= args[0]
        elif name == "add_groups":
            value += args[0] * args[1]
        elif name == "sub_groups":
            value -= args[0] * args[1]
        elif name == "double":
            value += value
        elif name == "share":
            assert value % args[0] == 0, "a share must divide exactly"
            value = value // args[0]
        else:
            raise AssertionError(f"unknown op {op}")
        assert value >= 1, "amounts stay positive"
    return value


def test_deterministic():
    a, b = generate(120, seed=3), generate(120, seed=3)
    assert [p.as_dict() for p in a] == [p.as_dict() for p in b]
    assert [p.text for p in generate(120, seed=4)] != [p.text for p in a]
    # a prefix of a longer set is the shorter set
    assert [p.text for p in generate(50, seed=3)] == [p.text for p in a[:50]]


def test_default_set_shape():
    problems = generate()
    assert len(problems) == 100
    assert len({p.text for p in problems}) == 100
    assert {p.steps for p in problems} == {2, 3, 4}
    assert [p.id for p in problems] == list(range(100))


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_answers_recomputed_from_structure(seed):
    for p in generate(300, seed=seed):
        assert p.answer == recompute(p.start, p.ops), p.text
        assert 2 <= len(p.ops) <= 4
        # the text states the start and every operand
        assert p.text.startswith(f"{p.name} has {p.start} ")
        numbers = [int(n) for n in re.findall(r"\d+", p.text)]
        operands = [x for op in p.ops for x in op[1:]]
        assert numbers[0] == p.start and sorted(numbers[1:]) == sorted(operands)
        assert p.text.endswith("?")
        if p.ops[-1][0] == "share":
            assert "each" in p.text.split(".")[-1]
        assert all(op[0] != "share" for op in p.ops[:-1])


def test_prompt():
    p = generate(1)[0]
    text = build_prompt(p)
    assert text.startswith(INSTRUCTION) and text.endswith(p.text)
    assert "The answer is N." in text and "blank line" in text
    assert "Example" not in build_prompt(p, example=False)
    assert messages(p) == [{"role": "user", "content": text}]


@pytest.mark.parametrize("text, want", [
    ("The answer is 15.", 15),
    ("12 + 3 = 15\n\nThe answer is 15", 15),
    ("so 10 - 5 = 5.\n\nThe answer is 5.", 5),
    ("10-5", 5),
    ("The answer is -3.", -3),
    ("It costs $1,234 in all.", 1234),
    ("3,5", 5),
    ("each box holds 2.5 marbles", 2.5),
    ("The answer is 14.0", 14),
    ("The answer is 7 apples.", 7),
    ("no number here", None),
    ("", None),
    (None, None),
])
def test_extract_last_number(text, want):
    got = extract_last_number(text)
    assert got == want and type(got) is type(want)


def test_extract_numbers_order():
    assert extract_numbers("Tom buys 2 x 3 = 6 pens, then 4 + 6 = 10.") == [2, 3, 6, 4, 6, 10]


def test_is_correct():
    assert is_correct("Step one.\n\nThe answer is 42.", 42)
    assert not is_correct("The answer is 42. Or maybe 41.", 42)
    assert is_correct("42", 42) and is_correct(42, 42) and is_correct(42.0, 42)
    assert not is_correct(None, 42) and not is_correct("", 42) and not is_correct(True, 1)


def test_reported_answers():
    """What a server's consensus/search object may hold as its answer."""
    assert is_correct("42", 42) and is_correct("84/2", 42) and is_correct(" +42 ", 42)
    assert not is_correct("1/2", 42) and not is_correct("4/0", 4)
