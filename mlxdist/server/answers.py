"""Final answers out of generated text, and vote tables over them.

Self-consistency and verifier-weighted search both reduce many candidate solutions to one
answer by voting. Two candidates agree when their extracted answers are equal after
normalizing: numbers by value ("42", "42.0", "+42" and "84/2" are one vote; "1/2" and "0.5"
too), other text by its whitespace. Thinking (`<think>...</think>`) is stripped first, so a
number the model only considered along the way does not count as its answer.

Extraction modes (`how`):
  "boxed"        the last complete `\\boxed{...}` (braces balanced; `\\fbox` too)
  "last_number"  the last integer, decimal or fraction (thousands commas allowed)
  "regex:PAT"    the last match of PAT: its group 1 if PAT has groups, else the whole match
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from mlxdist.server.reasoning import split_reasoning

EXTRACT_MODES = ("boxed", "last_number", "regex:PATTERN")

# a number not glued to a word or a decimal point before it; a sign only where it cannot
# be a minus between two operands ("2023-2024" ends in 2024, "x=-3" in -3)
_NUMBER_BODY = r"(?:\d+(?:,\d{3}(?!\d))*(?:\.\d+)?|\.\d+)(?:/\d+(?!\.\d))?"
_NUMBER = re.compile(r"(?<![\w.])[-+]?" + _NUMBER_BODY)
_NUMBER_FULL = re.compile(r"[-+]?" + _NUMBER_BODY)
_FRAC = re.compile(r"([-+]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# what says "this is the final answer" to beam search when answers are numbers
_ANSWER_CUE = re.compile(r"(?i)\b(?:final answer|answer is)\b[^\n]*?\d")


def check_extract(how: str) -> None:
    """Raise ValueError (a one-line reason) when `how` is not an extraction mode."""
    if how in ("boxed", "last_number"):
        return
    if how.startswith("regex:"):
        if not how[6:]:
            raise ValueError("'regex:' needs a pattern after the colon")
        try:
            re.compile(how[6:])
        except re.error as e:
            raise ValueError(f"the pattern in '{how}' does not compile: {e}") from None
        return
    raise ValueError(f"unknown extraction '{how}': use boxed, last_number or regex:PATTERN")


def answer_text(text: str, starts_inside: bool = False) -> str:
    """The answer part of a generation: its thinking dropped. An output that never closed
    its thinking has no answer part (empty string)."""
    return split_reasoning(text, starts_inside)[1]


def last_boxed(text: str) -> str | None:
    """The contents of the last complete `\\boxed{...}` (nested braces kept), or None. A
    trailing box cut off before its closing brace is skipped: it is not an answer yet."""
    found = None
    for m in _BOXED.finditer(text):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found = text[start:i]
                    break
    return found


def canonical_number(value: Fraction) -> str:
    """One spelling per value: integers bare, finite decimals as decimals without trailing
    zeros, any other fraction as 'p/q' in lowest terms."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    rest, twos, fives = den, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return f"{value.numerator}/{den}"
    places = max(twos, fives)
    digits = str(abs(value.numerator) * 10 ** places // den).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def number_value(text: str) -> Fraction | None:
    """The value of `text` if it is exactly one number ('1,234.5', '-3/4', '+42'), else None."""
    if not _NUMBER_FULL.fullmatch(text):
        return None
    num, _, den = text.replace(",", "").lstrip("+").partition("/")
    try:
        value = Fraction(num)
        return value / Fraction(den) if den else value
    except (ValueError, ZeroDivisionError):
        return None


def normalize(answer: str) -> str:
    """The key answers vote under: whitespace collapsed, surrounding `$` and a final period
    dropped, and numbers (`\\frac{a}{b}` included) by value."""
    s = " ".join(answer.split()).strip("$ ").rstrip(".").strip()
    s = s.replace("\\!", "").replace("{,}", ",")
    frac = _FRAC.fullmatch(s)
    numeric = f"{frac[1]}{frac[2].strip()}/{frac[3].strip()}" if frac else s
    value = number_value(numeric)
    return canonical_number(value) if value is not None else s


def extract_answer(text: str, how: str, starts_inside: bool = False) -> str | None:
    """The normalized final answer of one generation, or None when it has none."""
    content = answer_text(text, starts_inside)
    raw: str | None = None
    if how == "boxed":
        raw = last_boxed(content)
    elif how == "last_number":
        matches = _NUMBER.findall(content)
        raw = matches[-1] if matches else None
    elif how.startswith("regex:"):
        pattern = re.compile(how[6:])
        last = None
        for last in pattern.finditer(content):
            pass
        if last is not None:
            raw = last.group(1) if pattern.groups else last.group(0)
    else:
        check_extract(how)  # raises
    if raw is None:
        return None
    key = normalize(raw)
    return key or None


def is_final(text: str, how: str, starts_inside: bool = False) -> bool:
    """Whether a partial solution already states its final answer (beam search stops a beam
    there): a complete `\\boxed{}` in any mode; for "regex:" a match of the pattern; for
    "last_number" also a line saying 'final answer' / 'answer is' with a number after it.
    Thinking does not count."""
    content = answer_text(text, starts_inside)
    if last_boxed(content) is not None:
        return True
    if how.startswith("regex:"):
        return extract_answer(content, how) is not None
    return how == "last_number" and _ANSWER_CUE.search(content) is not None


@dataclass(frozen=True)
class Vote:
    """One row of a vote table: an answer, how many candidates gave it, their summed weight
    (their count when unweighted) and which candidates they were (ascending)."""

    answer: str | None
    count: int
    weight: float
    indices: tuple[int, ...]


def vote(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> list[Vote]:
    """The vote table, winner first: by weight (the count when unweighted), then count,
    then the earliest first candidate. Candidates without an answer (None) form one row,
    always last: they win only when no candidate has an answer."""
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    groups: dict[str | None, list[int]] = {}
    for i, a in enumerate(answers):
        groups.setdefault(a, []).append(i)
    rows = [Vote(a, len(ix), float(sum(weights[i] for i in ix)) if weights is not None else float(len(ix)),
                 tuple(ix)) for a, ix in groups.items()]
    rows.sort(key=lambda v: (v.answer is None, -v.weight, -v.count, v.indices[0]))
    return rows


def decided(counts: Sequence[int], remaining: int) -> bool:
    """True when the `remaining` unfinished candidates cannot change the winner of an
    unweighted vote whose answers so far have these `counts` (any order, no None row).

    The rule is strict: leader > second + remaining. Were every remaining candidate to vote
    for the runner-up (or for an answer not seen yet, which starts from 0 <= second), the
    runner-up would reach at most second + remaining. Equality is not enough: a tie is
    broken by the earliest first candidate, and a still-running candidate may come before
    the leader's first one (candidates finish out of order). With nothing remaining the
    table is final: True."""
    if remaining <= 0:
        return True
    ranked = sorted(counts, reverse=True)
    leader = ranked[0] if ranked else 0
    second = ranked[1] if len(ranked) > 1 else 0
    return leader > second + remaining
