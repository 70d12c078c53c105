"""The one exception type the CLI turns into a one-line message and exit status 2.

Library functions raise `UserInputError` for problems a user can fix (a missing path, a malformed spec, an
unknown architecture, a dimension mismatch, a corrupt file given as input). Anything else is a bug and keeps its
traceback.
"""

import re

__all__ = ["UserInputError", "first_line"]


class UserInputError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), terminal colours removed, for
    one-line reports."""
    text = str(error).strip() or type(error).__name__
    return re.sub(r"\x1b\[[0-9;]*m", "", text.splitlines()[0])
