"""The one exception type that means "the user did something wrong", and `plural` for
counts in what users read.

The CLI prints its message on one line and exits non-zero; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input or environment, reported without a traceback."""

    exit_code = 2


def plural(n: int, noun: str, many: str | None = None) -> str:
    """`n noun` with the noun in the plural unless n is 1: plural(1, "rank") == "1 rank",
    plural(3, "rank") == "3 ranks", plural(2, "entry", "entries") == "2 entries"."""
    return f"{n} {noun if n == 1 else (many or noun + 's')}"
