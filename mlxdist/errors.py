"""The one exception type that means "the user did something wrong".

The CLI prints its message on one line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input or environment, reported without a traceback."""

    exit_code = 2
