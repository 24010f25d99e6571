"""Keep a reasoning model's thinking apart from its answer.

DeepSeek-R1 (and Qwen3, QwQ, ...) write `<think> ... </think>` before the answer. Clients
expect the thinking in `reasoning_content`, as DeepSeek's own API gives it. Tokens arrive a
few characters at a time, so a tag may be split over several tokens: the splitter holds back
any tail that could still grow into a tag. Some chat templates (R1's) end the prompt with an
open `<think>`, so the output starts inside the reasoning: `starts_inside` covers that.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def prompt_opens_think(prompt_text: str) -> bool:
    """True when the prompt leaves a `<think>` open (the model continues inside it)."""
    opened = prompt_text.rfind(THINK_OPEN)
    return opened >= 0 and prompt_text.find(THINK_CLOSE, opened) < 0


def think_markers(tokenizer: object) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The token ids that open and close the model's thinking: its tokenizer's own markers
    where mlx-lm knows them (`<think>` tokens, and other models' kin), else `<think>` and
    `</think>` as text; ((), ()) when the tokenizer cannot say."""
    start = getattr(tokenizer, "think_start", None) if getattr(tokenizer, "has_thinking", False) else None
    end = getattr(tokenizer, "think_end", None) if start else None
    start, end = start or THINK_OPEN, end or THINK_CLOSE
    try:
        encode = tokenizer.encode  # type: ignore[attr-defined]
        try:
            ids = encode(start, add_special_tokens=False), encode(end, add_special_tokens=False)
        except TypeError:
            ids = encode(start), encode(end)
        return tuple(int(t) for t in ids[0]), tuple(int(t) for t in ids[1])
    except Exception:  # noqa: BLE001 - no markers: thinking is then not followed
        return (), ()


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Feed text pieces; get (reasoning, content) pieces back. Only a `<think>` at the very
    start of the output (after whitespace) opens reasoning, so an answer that merely talks
    about the tag is left alone."""

    def __init__(self, starts_inside: bool = False) -> None:
        # "start": nothing but whitespace seen yet; "think": inside; "answer": after it
        self.state = "think" if starts_inside else "start"
        self.pending = ""
        self.strip_next = starts_inside  # drop the newline(s) right after a tag

    def feed(self, text: str) -> tuple[str, str]:
        self.pending += text
        reasoning, content = "", ""
        while True:
            if self.state == "start":
                stripped = self.pending.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.pending = stripped[len(THINK_OPEN):]
                    self.state, self.strip_next = "think", True
                    continue
                if stripped == "" or THINK_OPEN.startswith(stripped):
                    return reasoning, content  # not decided yet
                self.state = "answer"
                continue
            if self.state == "think":
                if self.strip_next:
                    self.pending = self.pending.lstrip()
                    if not self.pending:
                        return reasoning, content
                    self.strip_next = False
                end = self.pending.find(THINK_CLOSE)
                if end >= 0:
                    reasoning += self.pending[:end]
                    self.pending = self.pending[end + len(THINK_CLOSE):]
                    self.state, self.strip_next = "answer", True
                    continue
                keep = _partial_suffix(self.pending, THINK_CLOSE)
                reasoning += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                return reasoning, content
            # answer
            if self.strip_next:
                self.pending = self.pending.lstrip()
                if not self.pending:
                    return reasoning, content
                self.strip_next = False
            content += self.pending
            self.pending = ""
            return reasoning, content

    def flush(self) -> tuple[str, str]:
        """At the end of the output: whatever is held back goes where it was heading."""
        rest, self.pending = self.pending, ""
        if self.state == "think":
            return rest, ""
        if self.state == "start":
            return "", rest
        return "", rest


def split_reasoning(text: str, starts_inside: bool = False) -> tuple[str, str]:
    """Whole-text version: (reasoning, content)."""
    s = ReasoningSplitter(starts_inside)
    r1, c1 = s.feed(text)
    r2, c2 = s.flush()
    return r1 + r2, c1 + c2
