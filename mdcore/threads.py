"""torch's intra-op thread count, set for a block and restored after it."""

import contextlib
from collections.abc import Iterator

__all__ = ["torch_threads"]


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
