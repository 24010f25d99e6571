"""The <think> splitter against a plain whole-string reference, under every way of cutting
the output into token-sized pieces."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mlxdist.server.reasoning import ReasoningSplitter, prompt_opens_think, split_reasoning


def reference(text: str, starts_inside: bool) -> tuple[str, str]:
    """Independent reference, on the whole text at once, with a regex."""
    if starts_inside:
        text = "<think>" + text
    m = re.fullmatch(r"\s*<think>\s*(.*?)(?:</think>\s*(.*))?", text, re.S)
    if not m:
        return "", text
    return m.group(1), m.group(2) or ""


def feed_in_pieces(text: str, cuts: list[int], starts_inside: bool) -> tuple[str, str]:
    s = ReasoningSplitter(starts_inside)
    r, c, last = "", "", 0
    for cut in sorted(set(cuts)) + [len(text)]:
        dr, dc = s.feed(text[last:cut])
        r, c, last = r + dr, c + dc, cut
    dr, dc = s.flush()
    return r + dr, c + dc


WORDS = st.sampled_from(["<think>", "</think>", "<", "</", "<th", "think", ">", "\n", " ", "a", "bc", "é", "<b>"])


@settings(max_examples=300, deadline=None)
@given(st.lists(WORDS, max_size=12), st.lists(st.integers(0, 80), max_size=10), st.booleans())
def test_any_cut_gives_the_whole_string_answer(words, cuts, starts_inside):
    text = "".join(words)
    cuts = [c for c in cuts if c <= len(text)]
    assert feed_in_pieces(text, cuts, starts_inside) == reference(text, starts_inside)


def test_r1_style_output_split_one_character_at_a_time():
    text = "<think>\nLet me add 2 and 2.\n</think>\n\nThe answer is 4."
    assert feed_in_pieces(text, list(range(len(text))), False) == ("Let me add 2 and 2.\n", "The answer is 4.")


def test_template_that_opens_think_in_the_prompt():
    prompt = "<｜User｜>2+2?<｜Assistant｜><think>\n"
    assert prompt_opens_think(prompt)
    assert not prompt_opens_think("<think>old</think> new question")
    assert not prompt_opens_think("plain prompt")
    assert split_reasoning("Adding.\n</think>\n\n4", starts_inside=True) == ("Adding.\n", "4")


def test_no_reasoning_passes_through_and_late_tags_stay_in_the_answer():
    assert split_reasoning("Hello <think>not reasoning</think>") == ("", "Hello <think>not reasoning</think>")
    assert split_reasoning("<html>") == ("", "<html>")
    # unfinished thinking (max_tokens hit) stays reasoning
    assert split_reasoning("<think>\nstill going") == ("still going", "")
