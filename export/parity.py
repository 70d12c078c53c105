"""Parity between an exported graph and the eager PyTorch model: the numbers every export is judged by."""

from dataclasses import dataclass

import numpy as np

from mdcore.errors import UserInputError

__all__ = ["ExportError", "ParityBound", "compare_embeddings", "check_parity", "outputs_vary", "FP32_BOUND",
           "INT8_BOUND", "FP16_BOUND", "VARY_BELOW"]


class ExportError(UserInputError):
    """An export that cannot be made or misses its parity bound (one line, exit status 2 in the CLI)."""


@dataclass(frozen=True)
class ParityBound:
    max_abs_diff: float | None  # None: not bounded (quantized and half-precision graphs)
    min_cosine: float


FP32_BOUND = ParityBound(max_abs_diff=1e-4, min_cosine=0.9999)
FP16_BOUND = ParityBound(max_abs_diff=None, min_cosine=0.999)
INT8_BOUND = ParityBound(max_abs_diff=None, min_cosine=0.99)
VARY_BELOW = 0.99  # mean pairwise cosine of the eager outputs under which parity can tell a wrong file apart


def compare_embeddings(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Largest element-wise difference and smallest row cosine between two (N, D) embedding batches."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ExportError(f"exported output shape {candidate.shape} differs from the eager model's {reference.shape}")
    ref_unit = reference / np.linalg.norm(reference, axis=-1, keepdims=True)  # (N, D)
    cand_unit = candidate / np.linalg.norm(candidate, axis=-1, keepdims=True)  # (N, D)
    return {"max_abs_diff": float(np.abs(reference - candidate).max()),
            "min_cosine": float((ref_unit * cand_unit).sum(axis=-1).min())}


def check_parity(name: str, metrics: dict[str, float], bound: ParityBound) -> None:
    """Raise `ExportError` naming the file and the missed bound."""
    diff, cosine = metrics["max_abs_diff"], metrics["min_cosine"]
    if not np.isfinite(diff) or not np.isfinite(cosine):
        raise ExportError(f"{name}: outputs are not finite (max abs diff {diff}, min cosine {cosine})")
    if bound.max_abs_diff is not None and diff > bound.max_abs_diff:
        raise ExportError(f"{name} misses its parity bound: max abs diff {diff:.3g} > {bound.max_abs_diff:g} "
                          f"(min cosine {cosine:.6f})")
    if cosine < bound.min_cosine:
        raise ExportError(f"{name} misses its parity bound: min cosine {cosine:.6f} < {bound.min_cosine:g} "
                          f"(max abs diff {diff:.3g})")


def outputs_vary(embeddings: np.ndarray, below: float = VARY_BELOW) -> dict[str, float | bool]:
    """Whether a tower's outputs over different inputs differ enough for parity to mean something: the mean cosine
    between the rows of (N, D), every pair once. A tower that embeds every input alike (random-weight FastViT, its
    layer scales at 1e-5) passes any cosine bound whatever a converter did to it."""
    unit = np.asarray(embeddings, dtype=np.float64)
    unit = unit / np.linalg.norm(unit, axis=-1, keepdims=True)
    n = len(unit)
    if n < 2:
        return {"mean_pairwise_cosine": None, "varies": False}
    gram = unit @ unit.T
    mean = float((gram.sum() - np.trace(gram)) / (n * (n - 1)))
    return {"mean_pairwise_cosine": mean, "varies": bool(mean < below)}
