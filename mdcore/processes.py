"""The processes of a run, as accelerate sees them, on GPUs or on CPUs alike.

accelerate starts torch.distributed only when it knows the processes share a CPU backend (`cpu=True`); launched by
torchrun (or `accelerate launch --multi_gpu`) on a machine without CUDA, it otherwise gives every process rank 0 of
1, and N processes silently train N copies of one run. `launched_on_cpus()` tells it, and every `Accelerator` and
`PartialState` of the project is made through these functions so that they agree (accelerate keeps one state per
process, fixed by whichever is made first).
"""

import os

__all__ = ["launched_on_cpus", "process_state", "make_accelerator"]


def launched_on_cpus() -> bool:
    """Whether this process is one of several launched together (torchrun's variables) on a machine without CUDA,
    or accelerate was asked for CPUs (`ACCELERATE_USE_CPU`)."""
    import torch

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ
    return several and not torch.cuda.is_available()


def process_state():
    """accelerate's `PartialState` of this process (rank, world size, device), distributed on CPUs when needed."""
    from accelerate import PartialState

    return PartialState(cpu=launched_on_cpus())


def make_accelerator(**kwargs):
    """An `accelerate.Accelerator` with `kwargs`, on CPU processes when they were launched so."""
    from accelerate import Accelerator

    return Accelerator(cpu=launched_on_cpus(), **kwargs)
