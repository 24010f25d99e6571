"""Score (question, solution) pairs with a language model, for verifier-guided search.

Two kinds of verifier, both read one generated token's top logprobs (the engine gives the
20 most likely tokens at a step), so a pair costs one prefill and one decode step:

judge  Any chat model used as a grader: a fixed chat prompt asks whether the solution so
       far is correct, to be answered Yes or No. The score is P(Yes) / (P(Yes) + P(No)) at
       the first generated token, P(Yes) summing every top token whose text strips and
       lowers to "yes" ("Yes", " yes", "YES"), P(No) likewise. When neither shows up among
       the top tokens the judge said nothing usable: 0.5.

prm    A process reward model trained the Math-Shepherd way (e.g. math-shepherd-mistral-7b-
       prm). No chat template: the text is `question + " " + steps`, each step (the
       solution split at blank lines) followed by the step tag, steps joined by a newline:
       "Q S1 ки\\nS2 ки". The model's prediction at the last tag, among the good token
       ("+") and the bad token ("-"), is the step's correctness: the score is
       P(good) / (P(good) + P(bad)) at the first generated token (0.5 when neither shows).
       Tag, good, bad and join are `PrmFormat` fields, for PRMs trained with other ones.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from mlxdist.runtime.api import Engine, GenerationRequest, SamplingParams, TokenEvent
from mlxdist.server.generation import Run, decode, run_waves, start_generation
from mlxdist.server.reasoning import THINK_CLOSE, prompt_opens_think

KINDS = ("judge", "prm")
TOP_LOGPROBS = 20
NEUTRAL = 0.5  # the score of a pair the verifier could not judge

JUDGE_SYSTEM = "You are a careful grader of solutions to problems. You answer with one word."
JUDGE_PROMPT = ("Question:\n{question}\n\nSolution so far:\n{solution}\n\n"
                "Is the solution so far correct? Answer Yes or No.")

class VerifierError(RuntimeError):
    """The verifier engine failed a request."""


@dataclass(frozen=True)
class PrmFormat:
    """How a Math-Shepherd style PRM reads a solution."""

    tag: str = " ки"  # ends every step; the score is read at the last one
    good: str = "+"
    bad: str = "-"
    join: str = "\n"  # between a step's tag and the next step


@dataclass(frozen=True)
class Scores:
    """What one `score_detailed` call gave and cost."""

    scores: tuple[float, ...]
    calls: int  # pairs sent to the verifier (too long ones are not)
    prompt_tokens: int
    completion_tokens: int


def judge_messages(question: str, solution: str) -> list[dict[str, str]]:
    """The judge's chat: a fixed system line and the question/solution/ask."""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_PROMPT.format(question=question, solution=solution)}]


def solution_steps(solution: str) -> list[str]:
    """A solution's steps: its blank-line separated paragraphs, stripped, empty ones dropped."""
    return [s.strip() for s in solution.split("\n\n") if s.strip()]


def prm_text(question: str, solution: str, fmt: PrmFormat = PrmFormat()) -> str:
    """The PRM's input: the question, a space, then every step followed by the tag."""
    steps = solution_steps(solution) or [""]
    return f"{question} " + fmt.join.join(f"{step}{fmt.tag}" for step in steps)


def two_way(top: Iterable[tuple[str, float]], good: Callable[[str], bool], bad: Callable[[str], bool]) -> float:
    """P(good) / (P(good) + P(bad)) from (token text, logprob) pairs of distinct tokens."""
    p_good = p_bad = 0.0
    for text, logprob in top:
        if good(text):
            p_good += math.exp(logprob)
        elif bad(text):
            p_bad += math.exp(logprob)
    total = p_good + p_bad
    return p_good / total if total > 0 else NEUTRAL


def judge_probability(top: Iterable[tuple[str, float]]) -> float:
    """The judge's score from its first token's top (text, logprob) pairs."""
    return two_way(top, lambda t: t.strip().lower() == "yes", lambda t: t.strip().lower() == "no")


def prm_probability(top: Iterable[tuple[str, float]], fmt: PrmFormat = PrmFormat()) -> float:
    """The PRM's score from its first token's top (text, logprob) pairs."""
    return two_way(top, lambda t: t.strip() == fmt.good.strip(), lambda t: t.strip() == fmt.bad.strip())


def first_token_choices(event: TokenEvent, token_text: Callable[[int], str]) -> list[tuple[str, float]]:
    """(text, logprob) of every distinct token the event knows: the top list, plus the
    sampled token itself when it is not in it."""
    seen = dict(event.top_logprobs)
    if event.token is not None and event.logprob is not None:
        seen.setdefault(event.token, event.logprob)
    return [(token_text(t), lp) for t, lp in seen.items()]





def verifier_prompt(engine: Engine, question: str, solution: str, kind: str = "judge",
                    prm: PrmFormat = PrmFormat()) -> list[int]:
    """The token ids one pair sends. A judge whose chat template leaves `<think>` open (R1)
    gets it closed, so that its first token is the verdict rather than thinking."""
    tok: Any = engine.tokenizer
    if kind == "prm":
        return list(tok.encode(prm_text(question, solution, prm)))
    tokens = list(engine.encode_chat(judge_messages(question, solution)))
    if prompt_opens_think(decode(engine, tokens[-32:])):
        tokens += list(tok.encode(f"{THINK_CLOSE}\n\n", add_special_tokens=False))
    return tokens


def verifier_requests(engine: Engine, question: str, solutions: Sequence[str], kind: str = "judge",
                      prm: PrmFormat = PrmFormat()) -> list[GenerationRequest | None]:
    """One greedy one-token request with top logprobs per pair; None for a pair whose
    prompt does not fit the verifier's context (it scores NEUTRAL)."""
    out: list[GenerationRequest | None] = []
    for solution in solutions:
        tokens = verifier_prompt(engine, question, solution, kind, prm)
        fits = 0 < len(tokens) < engine.context_length
        out.append(GenerationRequest(tuple(tokens), max_tokens=1, sampling=SamplingParams(temperature=0.0),
                                     logprobs=TOP_LOGPROBS) if fits else None)
    return out








async def score_detailed(engine: Engine, loop: asyncio.AbstractEventLoop, question: str, solutions: Sequence[str],
                         kind: str = "judge", prm: PrmFormat = PrmFormat(), limit: int | None = None,
                         run: Run | None = None) -> Scores:
    """Score every solution against `question`. All pairs are submitted at once (the
    engine batches them), or `limit` at a time when given (the slots a caller holds).
    Raises VerifierError when the engine fails a pair."""
    if kind not in KINDS:
        raise ValueError(f"unknown verifier kind '{kind}': use {' or '.join(KINDS)}")
    run_ = run or (lambda fn, *args: loop.run_in_executor(None, fn, *args))
    requests = await run_(verifier_requests, engine, question, list(solutions), kind, prm)
    scores = [NEUTRAL] * len(requests)
    todo = [(i, r) for i, r in enumerate(requests) if r is not None]
    read = judge_probability if kind == "judge" else (lambda top: prm_probability(top, prm))
    tokens = [0] * len(todo)

    def on_event(k: int, event: TokenEvent) -> None:
        if event.finish_reason == "error":
            raise VerifierError(event.error or "the verifier failed")
        if event.token is not None:
            tokens[k] += 1
            if tokens[k] == 1:  # the first token is the verdict
                scores[todo[k][0]] = read(first_token_choices(event, lambda t: decode(engine, [t])))

    await run_waves(lambda wave: start_generation(engine, wave, loop, run), [r for _, r in todo],
                    limit or len(todo), on_event)
    return Scores(tuple(scores), len(todo), sum(len(r.prompt_tokens) for _, r in todo), sum(tokens))


async def score(engine: Engine, loop: asyncio.AbstractEventLoop, question: str, solutions: list[str],
                kind: str = "judge", prm: PrmFormat = PrmFormat(), limit: int | None = None,
                run: Run | None = None) -> list[float]:
    """Each solution's score in [0, 1] (see the module's docstring), in order."""
    return list((await score_detailed(engine, loop, question, solutions, kind, prm, limit, run)).scores)
