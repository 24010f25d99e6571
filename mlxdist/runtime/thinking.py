"""A sequence's thinking section, followed token by token on rank 0: where it opens and
closes, how many tokens it took, and, with a budget, the closing text the engine writes
itself once the budget is spent (as llama.cpp, vLLM and SGLang do): the model then goes on
with its answer.

Token ids only; the server finds the model's own markers (runtime/api.py `Thinking`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxdist.runtime.api import Thinking

UNLIMITED = 1 << 30


@dataclass
class ThinkState:
    open: tuple[int, ...]
    close: tuple[int, ...]
    budget: int | None
    state: str = "opening"  # "opening": the output may yet open it; "inside"; "done"
    matched: int = 0  # tokens of `open` written so far (while opening)
    thought: int = 0  # tokens written inside (a closing text the model writes itself included)
    forced: list[int] = field(default_factory=list)  # closing tokens still to write instead of sampled ones
    recent: list[int] = field(default_factory=list)  # the last tokens inside, to spot `close`

    @classmethod
    def start(cls, spec: Thinking | None) -> "ThinkState | None":
        if spec is None or not spec.close:
            return None
        s = cls(tuple(spec.open), tuple(spec.close), spec.budget)
        if spec.inside:
            s.state = "inside"
        elif not s.open:
            s.state = "done"
        return s

    def take(self, token: int) -> tuple[int, bool]:
        """A sampled `token` came: the token the sequence gets in its place (a forced
        closing token once the budget is spent) and whether it belongs to the thinking."""
        if self.forced:
            t = self.forced.pop(0)
            if not self.forced:
                self.state = "done"
            return t, True
        if self.state == "opening":
            if token == self.open[self.matched]:
                self.matched += 1
                if self.matched == len(self.open):
                    self.state = "inside"
                return token, True
            self.state = "done"  # the answer starts without thinking
            return token, False
        if self.state != "inside":
            return token, False
        if self.budget is not None and self.thought >= self.budget:
            # a closing text the model had begun counts as written
            done = max((k for k in range(len(self.close), 0, -1) if self.recent[-k:] == list(self.close[:k])),
                       default=0)
            self.forced = list(self.close[done:])
            return self.take(token)
        self.thought += 1
        self.recent = (self.recent + [token])[-len(self.close):]
        if self.recent == list(self.close):
            self.state = "done"
        return token, True

    def free_steps(self) -> int:
        """How many more sampled tokens are certain to be kept as they are (none replaced
        by a forced one): a step fed by a token still in flight may go only within these."""
        if self.budget is None or self.state == "done":
            return UNLIMITED
        if self.forced:
            return 0
        if self.state == "opening":
            return len(self.open) - self.matched + self.budget
        return self.budget - self.thought

    @property
    def open_ended(self) -> bool:
        """A budget that may yet force the closing text."""
        return self.budget is not None and self.state != "done"


def resume(spec: Thinking | None, generated: list[int]) -> Thinking | None:
    """The thinking spec for a request replayed with its `generated` tokens appended to its
    prompt (after the ranks restarted): what is left of it."""
    s = ThinkState.start(spec)
    if s is None or not generated:
        return spec
    for t in generated:
        s.take(t)
    if s.state == "done":
        return None
    if s.state == "opening":
        return Thinking(s.open[s.matched:], s.close, False, s.budget)
    left = None if s.budget is None else max(0, s.budget - s.thought)
    if s.forced:  # the closing text was being written: the rest is forced at once
        return Thinking((), tuple(s.forced), True, 0)
    return Thinking(s.open, s.close, True, left)
