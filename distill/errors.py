"""The one exception type the CLI turns into a one-line message and exit status 2.

Library functions raise `UserInputError` for problems a user can fix (a missing path, a malformed spec, an
unknown architecture, a dimension mismatch). Anything else is a bug and keeps its traceback.
"""

__all__ = ["UserInputError"]


class UserInputError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""
