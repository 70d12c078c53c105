"""The cores this process may use, and torch's intra-op thread count, set for a block and restored after it."""

import contextlib
import os
from collections.abc import Iterator

__all__ = ["torch_threads", "usable_cores"]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[int]:
    """Run the block with `count` intra-op threads; the previous count is restored however it ends. Yields the
    previous count."""
    import torch  # mdcore loads no heavy library on import

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield previous
    finally:
        torch.set_num_threads(previous)
