"""The bottom layer: the user-error type, atomic file writing, output-path guards, directory locks and bounded
reading of untrusted JSON. It imports nothing of the project, and every other package may import it."""

from mdcore.atomic import (
    atomic_directory,
    copy_file_atomic,
    hidden_temporary,
    write_json_atomic,
    write_text_atomic,
)
from mdcore.errors import UserInputError, first_line

__all__ = ["UserInputError", "first_line", "atomic_directory", "copy_file_atomic", "hidden_temporary",
           "write_json_atomic", "write_text_atomic"]
