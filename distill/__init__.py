"""mobiledistill's distillation package: students, losses, training, evaluation and the command line.

`import distill` registers the shipped open_clip architectures (through `teachers`), so models that use them load
with plain open_clip afterwards.
"""

import os

# The training process shares its cores with DataLoader workers: OpenMP threads that spin while they wait for work
# would take those cores from the workers (docs/BENCHMARKS.md, "Data path"). OpenMP reads this when torch loads, so
# it is set before the first import of torch; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import teachers  # noqa: E402,F401  (registers the shipped architectures with open_clip)
from mdcore.errors import UserInputError  # noqa: E402

__all__ = ["UserInputError"]
