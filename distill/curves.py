"""Training curves: every loss term of a run's log rows against the step, and zero-shot top-1 where it was measured."""

from pathlib import Path
from typing import Any

__all__ = ["curves_figure", "save_curves"]


def curves_figure(rows: list[dict[str, Any]]):
    """A matplotlib figure of `rows` (log.jsonl's): the `loss` and `*_loss` keys, and `eval_top1` on a second axis."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: no display here
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if k.endswith("_loss") or k == "loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key)
    evals = [r for r in rows if isinstance(r.get("eval_top1"), int | float)]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [100 * r["eval_top1"] for r in evals], "k--o", label="test top-1 (%)")
        ax2.set_ylabel("zero-shot top-1 (%)")
        ax2.legend(loc="upper center")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def save_curves(rows: list[dict[str, Any]], path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(rows)
    fig.savefig(path, dpi=100)
    plt.close(fig)
