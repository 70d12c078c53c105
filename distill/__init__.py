"""mobiledistill's distillation package: students, losses, training, evaluation and the command line.

`import distill` registers the shipped open_clip architectures (through `teachers`), so models that use them load
with plain open_clip afterwards.
"""

import teachers  # noqa: F401  (registers the shipped architectures with open_clip)
from mdcore.errors import UserInputError

__all__ = ["UserInputError"]
