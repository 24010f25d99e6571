"""A synthetic task set for the test-time-compute benchmark (tools/bench_ttc.py):
multi-step arithmetic word problems with known integer answers, generated deterministically
from a seed (no download, no data set).

    python tools/ttc_tasks.py [--problems 100] [--seed 0] [--prompt]   # print them as JSON lines

Each problem is a start amount and 2-4 operations on it, each written as one sentence:

    add          "She finds 4 more apples."                        +x
    sub          "She gives 3 apples to Ben."                      -x
    add_groups   "She buys 3 bags with 5 apples in each bag."      +k*m
    sub_groups   "She gives 2 apples to each of 4 friends."        -k*m
    double       "Ben gives her as many apples as she already has." *2
    share        (last only) "She puts all her apples into 4 boxes with the same number in
                  each box. How many apples are in each box?"      /k (always exact)

The numbers stay small (a start of 5-20, amounts of 1-9, groups of 2-5 by 2-6) and every
intermediate amount stays positive, so that a small instruct model has a chance. The
structured form (`Problem.start`, `Problem.ops`) is kept beside the text, so the answer can
be recomputed independently (tests/test_ttc_tasks.py does).

`build_prompt` wraps a problem in the instruction (reason step by step, steps separated by
blank lines, end with "The answer is N.") and one worked example; `extract_last_number`
and `is_correct` are the checker (the last number in the text against the truth, the same
rule as the server's `"extract": "last_number"`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass, field

Op = tuple  # ("add", x) | ("sub", x) | ("add_groups", k, m) | ("sub_groups", k, m) | ("double",) | ("share", k)

NAMES = [("Ana", "she"), ("Ben", "he"), ("Cara", "she"), ("David", "he"), ("Emma", "she"), ("Felix", "he"),
         ("Grace", "she"), ("Hugo", "he"), ("Iris", "she"), ("Jack", "he"), ("Lena", "she"), ("Omar", "he"),
         ("Maya", "she"), ("Noah", "he"), ("Rosa", "she"), ("Sam", "he")]
ITEMS = [("apple", "bag"), ("marble", "box"), ("pencil", "pack"), ("sticker", "sheet"), ("cookie", "jar"),
         ("book", "box"), ("card", "pack"), ("shell", "bucket"), ("egg", "carton"), ("balloon", "pack"),
         ("stamp", "sheet"), ("orange", "bag")]
FRIENDS = ["Tom", "Mia", "Leo", "Zoe", "Max", "Ella", "Ivan", "Nina"]

INSTRUCTION = ("Solve the math problem. Reason step by step: write each step on its own line, with a "
               "blank line between steps. End with \"The answer is N.\" where N is a number.")
EXAMPLE_PROBLEM = ("Tom has 4 pens. He buys 2 boxes with 3 pens in each box. Then he gives 5 pens to Mia. "
                   "How many pens does Tom have now?")
EXAMPLE_SOLUTION = ("Tom buys 2 x 3 = 6 pens.\n\n"
                    "Now Tom has 4 + 6 = 10 pens.\n\n"
                    "He gives 5 pens to Mia, so he has 10 - 5 = 5 pens.\n\n"
                    "The answer is 5.")


@dataclass(frozen=True)
class Problem:
    id: int
    name: str
    item: str  # singular
    start: int
    ops: tuple[Op, ...]
    text: str
    answer: int
    steps: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", len(self.ops))

    def as_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "answer": self.answer, "steps": self.steps,
                "start": self.start, "ops": [list(op) for op in self.ops]}


def apply_op(value: int, op: Op) -> int:
    kind = op[0]
    if kind == "add":
        return value + op[1]
    if kind == "sub":
        return value - op[1]
    if kind == "add_groups":
        return value + op[1] * op[2]
    if kind == "sub_groups":
        return value - op[1] * op[2]
    if kind == "double":
        return value * 2
    if kind == "share":
        return value // op[1]
    raise ValueError(f"unknown op {op!r}")


def solve(start: int, ops: tuple[Op, ...]) -> int:
    value = start
    for op in ops:
        value = apply_op(value, op)
    return value


def _plural(item: str, n: int = 2) -> str:
    return item if n == 1 else (item + "es" if item.endswith(("ch", "sh", "s", "x")) else item + "s")


def _choose_op(rng: random.Random, value: int, last: bool) -> Op:
    """One operation valid at `value` (the amount never drops below 1; `share` only as the
    last step and only when it divides exactly into at least 2 each)."""
    kinds = ["add", "sub", "add_groups", "sub_groups", "double"]
    weights = [3, 3, 3, 2, 1]
    if last:
        kinds.append("share")
        weights.append(2)
    while True:
        kind = rng.choices(kinds, weights)[0]
        if kind == "add":
            return ("add", rng.randint(1, 9))
        if kind == "sub" and value > 2:
            return ("sub", rng.randint(1, min(9, value - 1)))
        if kind == "add_groups":
            return ("add_groups", rng.randint(2, 5), rng.randint(2, 6))
        if kind == "sub_groups":
            pairs = [(k, m) for k in range(2, 5) for m in range(1, 6) if k * m < value]
            if pairs:
                return ("sub_groups", *rng.choice(pairs))
        if kind == "double" and value <= 30:
            return ("double",)
        if kind == "share":
            ks = [k for k in range(2, 7) if value % k == 0 and value // k >= 2]
            if ks:
                return ("share", rng.choice(ks))


def _sentence(op: Op, name: str, pron: str, item: str, container: str, friend: str, rng: random.Random) -> str:
    subj = pron.capitalize()
    obj = "her" if pron == "she" else "him"
    has = f"{pron} already has"
    kind = op[0]
    if kind == "add":
        x = op[1]
        return rng.choice([f"{subj} finds {x} more {_plural(item, x)}.",
                           f"{subj} buys {x} more {_plural(item, x)}.",
                           f"{friend} gives {obj} {x} {_plural(item, x)}."])
    if kind == "sub":
        x = op[1]
        return rng.choice([f"{subj} gives {x} {_plural(item, x)} to {friend}.",
                           f"{subj} loses {x} {_plural(item, x)}.",
                           f"{subj} sells {x} {_plural(item, x)}."])
    if kind == "add_groups":
        k, m = op[1], op[2]
        return f"{subj} buys {k} {_plural(container, k)} with {m} {_plural(item, m)} in each {container}."
    if kind == "sub_groups":
        k, m = op[1], op[2]
        return f"{subj} gives {m} {_plural(item, m)} to each of {k} friends."
    if kind == "double":
        return f"{friend} gives {obj} as many {_plural(item)} as {has}."
    if kind == "share":
        k = op[1]
        poss = "her" if pron == "she" else "his"
        return (f"{subj} puts all {poss} {_plural(item)} into {k} {_plural(container, k)} with the same number "
                f"in each {container}.")
    raise ValueError(f"unknown op {op!r}")


def make_problem(rng: random.Random, pid: int) -> Problem:
    name, pron = rng.choice(NAMES)
    item, container = rng.choice(ITEMS)
    friend = rng.choice(FRIENDS)
    steps = rng.randint(2, 4)
    start = rng.randint(5, 20)
    value, ops = start, []
    for i in range(steps):
        op = _choose_op(rng, value, last=i == steps - 1)
        ops.append(op)
        value = apply_op(value, op)
    sentences = [f"{name} has {start} {_plural(item, start)}."]
    for i, op in enumerate(ops):
        s = _sentence(op, name, pron, item, container, friend, rng)
        sentences.append(("Then " + s[0].lower() + s[1:]) if i and s.startswith(pron.capitalize()) and
                         rng.random() < 0.5 else s)
    if ops[-1][0] == "share":
        sentences.append(f"How many {_plural(item)} are in each {container}?")
    else:
        sentences.append(f"How many {_plural(item)} does {name} have now?")
    return Problem(pid, name, item, start, tuple(ops), " ".join(sentences), value)


def generate(n: int = 100, seed: int = 0) -> list[Problem]:
    """`n` problems, the same for the same (n, seed) on any machine (a private Random)."""
    rng = random.Random(f"ttc-tasks-{seed}")
    return [make_problem(rng, i) for i in range(n)]


def build_prompt(problem: Problem, example: bool = True) -> str:
    """The user message: the instruction, one worked example (unless `example` is false),
    then the problem."""
    parts = [INSTRUCTION]
    if example:
        parts.append(f"Example problem: {EXAMPLE_PROBLEM}\n\nExample solution:\n{EXAMPLE_SOLUTION}")
    parts.append(f"Problem: {problem.text}")
    return "\n\n".join(parts)


def messages(problem: Problem, example: bool = True) -> list[dict[str, str]]:
    return [{"role": "user", "content": build_prompt(problem, example)}]


# a number: 1,234 (thousands separators) or 1234, an optional decimal part, an optional sign
_NUMBER = re.compile(r"(-)?(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(\.\d+)?")


def extract_numbers(text: str) -> list[int | float]:
    """Every number in `text`, in order. A minus sign counts only when it does not follow a
    letter or digit ("10-5" is 10 and 5); "1,234" is one number; "5." is 5; "2.50" is 2.5."""
    out: list[int | float] = []
    for m in _NUMBER.finditer(text):
        sign, whole, frac = m.groups()
        negative = bool(sign) and (m.start() == 0 or not text[m.start() - 1].isalnum())
        digits = whole.replace(",", "")
        if frac and frac.strip(".0"):
            value: int | float = float(digits + frac)
        else:
            value = int(digits)
        out.append(-value if negative else value)
    return out


def extract_last_number(text: str | None) -> int | float | None:
    """The last number in `text` (None when there is none)."""
    numbers = extract_numbers(text or "")
    return numbers[-1] if numbers else None


def as_number(value: object) -> int | float | None:
    """An answer as a server may report it (a number, or a string holding one) as a number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value) if float(value).is_integer() else value
    if isinstance(value, str):
        frac = re.fullmatch(r"\s*([-+]?\d+)\s*/\s*(\d+)\s*", value)
        if frac and int(frac.group(2)):
            q = int(frac.group(1)) / int(frac.group(2))
            return int(q) if q.is_integer() else q
        return extract_last_number(value)
    return None


def is_correct(text_or_answer: object, truth: int) -> bool:
    """True when the last number of a text (or a reported answer) equals `truth`."""
    got = as_number(text_or_answer)
    return got is not None and got == truth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problems", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", action="store_true", help="print the full prompt instead of the problem text")
    args = p.parse_args()
    for prob in generate(args.problems, args.seed):
        d = prob.as_dict()
        if args.prompt:
            d["prompt"] = build_prompt(prob)
        print(json.dumps(d))


if __name__ == "__main__":
    main()
