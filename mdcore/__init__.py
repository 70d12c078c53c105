"""The bottom layer: the user-error type, atomic file writing, output-path guards, directory locks and bounded
reading of untrusted JSON. It imports nothing of the project, and every other package may import it.

Every package of the project imports this one first, before torch: processes share their cores with DataLoader
workers, and OpenMP threads that spin while they wait for work would take those cores from the workers
(docs/BENCHMARKS.md, "Data path"). OpenMP reads the wait policy when torch loads; an explicit setting wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from mdcore.atomic import (  # noqa: E402
    atomic_directory,
    copy_file_atomic,
    hidden_temporary,
    write_json_atomic,
    write_text_atomic,
)
from mdcore.errors import UserInputError, first_line  # noqa: E402

__all__ = ["UserInputError", "first_line", "atomic_directory", "copy_file_atomic", "hidden_temporary",
           "write_json_atomic", "write_text_atomic"]
