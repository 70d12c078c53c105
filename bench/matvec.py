"""One-row matrix products on this CPU: how fast each way of computing them reads its weight, one run.

    python bench/matvec.py

A batch-1 decoding step is one-row products (x (1, in) times a weight), so its speed is the speed at which they
stream their weights. Timed, at the thread count given (default: torch's), over 40 distinct weights per shape so
that none stays in cache, best of 5 passes after warm-ups:
- `F.linear` eager: the BLAS call open_clip's layers make, weight (out, in);
- compiled: the same `F.linear` under `torch.compile` with inductor's decompose_mm pass (which
  `teachers.coca_decoding` turns on for its CPU step), making a one-row product a fused multiply-and-sum;
- the vocabulary projection's layout, weight (in, out) = (W, 49408), as `x @ P`, eager and compiled;
- the memory bandwidth: a sum over a 400 MB tensor.
"""

import argparse

import torch
import torch.nn.functional as F
from captioner import best_seconds  # bench/captioner.py, beside this script (it puts the repository on the path)

from teachers.coca_decoding import _CPU_OPTIONS

_OPTIONS = {"post_grad_fusion_options": _CPU_OPTIONS["post_grad_fusion_options"]}  # the decoder's decomposition


def rates(fn, x: torch.Tensor, size_gb: float) -> tuple[float, float]:
    """GB/s of `fn(x)` eager and under torch.compile with `_OPTIONS`."""
    compiled = torch.compile(fn, dynamic=False, options=_OPTIONS)
    return size_gb / best_seconds(lambda: fn(x), 5), size_gb / best_seconds(lambda: compiled(x), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    big = torch.ones(100_000_000)
    stream = big.numel() * 4 / best_seconds(big.sum, 5) / 1e9
    del big
    print(f"{torch.get_num_threads()} threads; a 400 MB sum streams at {stream:.1f} GB/s\n")
    print("| weight | layout | eager GB/s | compiled GB/s | compiled / eager |")
    print("|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in ((512, 512), (2048, 512), (512, 2048), (1536, 512)):
        weights = [torch.randn(out_features, in_features, generator=generator) for _ in range(40)]
        x = torch.randn(1, in_features, generator=generator)

        def linear(x, weights=weights):
            return [F.linear(x, w) for w in weights]

        eager_rate, compiled_rate = rates(linear, x, sum(w.numel() * 4 for w in weights) / 1e9)
        print(f"| {out_features}x{in_features} | (out, in), F.linear | {eager_rate:.1f} | {compiled_rate:.1f} | "
              f"{compiled_rate / eager_rate:.2f} |", flush=True)
    for width in (192, 512):
        projections = [torch.randn(width, 49408, generator=generator) for _ in range(4)]
        x = torch.randn(1, width, generator=generator)

        def project(x, projections=projections):
            return [x @ p for p in projections]

        eager_rate, compiled_rate = rates(project, x, sum(p.numel() * 4 for p in projections) / 1e9)
        print(f"| {width}x49408 | (in, out), x @ P | {eager_rate:.1f} | {compiled_rate:.1f} | "
              f"{compiled_rate / eager_rate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
