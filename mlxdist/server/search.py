"""Verifier-guided search: best-of-N, beam search over steps, and diverse verifier tree
search (DVTS), after "Scaling test-time compute" (Snell et al., 2024) and Hugging Face's
search-and-learn recipes.

The strategies see the model through two async callables, so they run (and are tested)
without one:

  generate(prefixes, n_each, stop, max_tokens, seeds) -> list[Completion]
      n_each continuations of every prefix (the assistant's text so far), prefix-major:
      result k continues prefixes[k // n_each] with seeds[k]. `stop` ends a step (None:
      whole answers); `max_tokens` bounds each continuation: one int for all, or a list
      with one cap per prefix.
  score(solutions) -> list[float]
      a verifier's score in [0, 1] per (partial) solution.

A step is a blank-line separated paragraph: generation stops at "\\n\\n". A path finishes
when its last step ended without that stop (EOS or length), or states a final answer
(answers.is_final), or has generated `max_tokens` in all (cut off by length: a request's
max_tokens bounds every answer it returns, whatever the strategy; each step's cap is what
is left of it). The final pick is always the weighted majority: the scores of the final
solutions summed per extracted answer (ties: the earlier solution), and within the
winning answer its best-scored solution. The single best-scored solution is reported too.

Deterministic: every candidate's seed derives from the request's seed (best-of-N uses
seed + i, like `n`; the step searches `derive_seed(seed, ...)` of where it sits).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Awaitable, Callable

from mlxdist.server.answers import Vote, extract_answer, is_final, vote

STEP = "\n\n"
STRATEGIES = ("best_of_n", "beam", "dvts")


@dataclass(frozen=True)
class Completion:
    """One continuation: its text (thinking included), tokens generated, the engine's
    finish reason, and whether it ended at the step stop (rather than EOS or length)."""

    text: str
    tokens: int
    finish_reason: str
    hit_stop: bool = False


Generate = Callable[[list[str], int, "str | None", "int | list[int]", list[int]], Awaitable[list[Completion]]]
Score = Callable[[list[str]], Awaitable[list[float]]]


@dataclass(frozen=True)
class SearchConfig:
    """One search. For beam search `beam_width` is the number of paths kept; for DVTS the
    number of independent subtrees: either way a round generates beam_width x n steps."""

    strategy: str = "best_of_n"
    n: int = 4  # best_of_n: answers; beam/dvts: candidates per path per step
    beam_width: int = 4
    max_steps: int = 40
    extract: str = "last_number"
    max_tokens: int = 1024  # per answer: a step search's path in all
    seed: int = 0
    starts_inside: bool = False  # the prompt leaves <think> open


@dataclass(frozen=True)
class Solution:
    """A final (or, at max_steps, unfinished) solution."""

    text: str
    score: float
    answer: str | None
    finish_reason: str  # "stop" (EOS or a final answer) or "length"
    tokens: int  # generated along its path


@dataclass(frozen=True)
class SearchResult:
    strategy: str
    solutions: tuple[Solution, ...]
    votes: tuple[Vote, ...]  # weighted by score, winner first
    chosen: int  # index in solutions: the weighted majority's best-scored solution
    best: int  # index in solutions: the best-scored solution
    answer: str | None
    steps: int  # rounds of generation
    generated_tokens: int  # by every candidate, kept or not
    verifier_calls: int  # (partial) solutions scored


@dataclass(frozen=True)
class _Path:
    text: str
    tokens: int
    score: float = 0.0


def derive_seed(seed: int, *where: int) -> int:
    """A 62-bit seed for the candidate at `where` (step, slot, ...), from the request's."""
    key = ":".join(str(x) for x in (seed, *where)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 2


def _argbest(scores: list[float], among: range | tuple[int, ...]) -> int:
    """The index with the highest score; ties go to the earliest."""
    return min(among, key=lambda i: (-scores[i], i))


def select(cfg: SearchConfig, solutions: list[Solution], steps: int, generated: int, calls: int) -> SearchResult:
    """The weighted-majority pick over final solutions."""
    scores = [s.score for s in solutions]
    table = vote([s.answer for s in solutions], scores)
    chosen = _argbest(scores, table[0].indices) if table else 0
    best = _argbest(scores, range(len(solutions))) if solutions else 0
    return SearchResult(cfg.strategy, tuple(solutions), tuple(table), chosen, best,
                        table[0].answer if table else None, steps, generated, calls)


def _solution(cfg: SearchConfig, text: str, score: float, finish_reason: str, tokens: int) -> Solution:
    return Solution(text, score, extract_answer(text, cfg.extract, cfg.starts_inside), finish_reason, tokens)


def _extend(cfg: SearchConfig, parent: _Path, c: Completion, score: float) -> tuple[_Path, Solution | None]:
    """The path after one more step, and its Solution when that step finished it."""
    text = parent.text + c.text + (STEP if c.hit_stop else "")
    path = _Path(text, parent.tokens + c.tokens, score)
    if not c.hit_stop:
        return path, _solution(cfg, text, score, c.finish_reason, path.tokens)
    if is_final(text, cfg.extract, cfg.starts_inside):
        return path, _solution(cfg, text[: -len(STEP)], score, "stop", path.tokens)
    if path.tokens >= cfg.max_tokens:  # its max_tokens spent: cut off by length
        return path, _solution(cfg, text[: -len(STEP)], score, "length", path.tokens)
    return path, None


def _room(cfg: SearchConfig, paths: list[_Path]) -> list[int]:
    """Each path's next step's cap: what is left of max_tokens."""
    return [max(1, cfg.max_tokens - p.tokens) for p in paths]


def _unfinished(cfg: SearchConfig, p: _Path) -> Solution:
    """A path still open at max_steps: its text so far, as cut off by length."""
    text = p.text[: -len(STEP)] if p.text.endswith(STEP) else p.text
    return _solution(cfg, text, p.score, "length", p.tokens)


async def best_of_n(cfg: SearchConfig, generate: Generate, score: Score) -> SearchResult:
    """N whole answers, each scored once; weighted majority over them."""
    outs = await generate([""], cfg.n, None, cfg.max_tokens, [cfg.seed + i for i in range(cfg.n)])
    scores = await score([c.text for c in outs])
    sols = [_solution(cfg, c.text, s, c.finish_reason, c.tokens) for c, s in zip(outs, scores)]
    return select(cfg, sols, 1, sum(c.tokens for c in outs), len(outs))


async def beam_search(cfg: SearchConfig, generate: Generate, score: Score) -> SearchResult:
    """Step-level beam search. The first round samples beam_width x n first steps from the
    prompt; every later round n next steps per open path. Each round all new candidates
    are scored and the best `beam_width - finished` (ties: earlier candidate) are kept;
    kept candidates that finished leave the beam as solutions, so exactly beam_width
    solutions come out (the paths still open at max_steps count as cut off by length)."""
    width = cfg.beam_width
    active, finished = [_Path("", 0)], []
    steps = generated = calls = 0
    while active and steps < cfg.max_steps:
        each = cfg.n * width if steps == 0 else cfg.n
        seeds = [derive_seed(cfg.seed, steps, k) for k in range(len(active) * each)]
        outs = await generate([p.text for p in active], each, STEP, _room(cfg, active), seeds)
        parents = [active[k // each] for k in range(len(outs))]
        texts = [p.text + c.text + (STEP if c.hit_stop else "") for p, c in zip(parents, outs)]
        scores = await score(texts)
        steps, generated, calls = steps + 1, generated + sum(c.tokens for c in outs), calls + len(texts)
        ranked = sorted(range(len(outs)), key=lambda i: (-scores[i], i))[: width - len(finished)]
        active = []
        for i in ranked:
            path, done = _extend(cfg, parents[i], outs[i], scores[i])
            if done is not None:
                finished.append(done)
            else:
                active.append(path)
    finished += [_unfinished(cfg, p) for p in active]
    return select(cfg, finished, steps, generated, calls)


async def dvts(cfg: SearchConfig, generate: Generate, score: Score) -> SearchResult:
    """Diverse verifier tree search: beam_width independent subtrees, each a greedy beam of
    width 1: its leaf expands n candidate steps, the best-scored (ties: earlier) becomes
    the leaf. A subtree ends when its leaf finishes; each gives its leaf as a solution."""
    trees = cfg.beam_width
    leaves = [_Path("", 0)] * trees
    done: list[Solution | None] = [None] * trees
    steps = generated = calls = 0
    while steps < cfg.max_steps:
        live = [t for t in range(trees) if done[t] is None]
        if not live:
            break
        seeds = [derive_seed(cfg.seed, t, steps, j) for t in live for j in range(cfg.n)]
        outs = await generate([leaves[t].text for t in live], cfg.n, STEP, _room(cfg, [leaves[t] for t in live]),
                              seeds)
        texts = [leaves[live[k // cfg.n]].text + c.text + (STEP if c.hit_stop else "") for k, c in enumerate(outs)]
        scores = await score(texts)
        steps, generated, calls = steps + 1, generated + sum(c.tokens for c in outs), calls + len(texts)
        for k, t in enumerate(live):
            i = _argbest(scores, range(k * cfg.n, (k + 1) * cfg.n))
            leaves[t], done[t] = _extend(cfg, leaves[t], outs[i], scores[i])
    solutions = [d if d is not None else _unfinished(cfg, leaves[t]) for t, d in enumerate(done)]
    return select(cfg, solutions, steps, generated, calls)


async def run_search(cfg: SearchConfig, generate: Generate, score: Score) -> SearchResult:
    """Run the strategy `cfg.strategy` names."""
    strategies = {"best_of_n": best_of_n, "beam": beam_search, "dvts": dvts}
    if cfg.strategy not in strategies:
        raise ValueError(f"unknown strategy '{cfg.strategy}': use {', '.join(STRATEGIES)}")
    return await strategies[cfg.strategy](cfg, generate, score)
