"""mobiledistill's distillation package: losses, weight inheritance, pruning, training (students and teachers)
and evaluation.

`import distill` registers the shipped open_clip architectures (through `mdmodels`), so models that use them load
with plain open_clip afterwards.
"""

import mdcore  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
import mdmodels  # noqa: F401  (registers the shipped architectures with open_clip)
from mdcore.errors import UserInputError

__all__ = ["UserInputError"]
