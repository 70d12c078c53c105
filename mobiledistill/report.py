"""`mobiledistill report`: one self-contained HTML page comparing runs (accuracy against latency).

For each run directory (any model directory mobiledistill writes):
- parameters, counted from the safetensors header (image tower = `visual.*`, text = the rest but the logit scale);
- zero-shot top-1 and retrieval R@1 from the last evaluation stored in `mobiledistill.json`;
- latency per tower, from `bench --json` output when the run holds one (`RUN_DIR/export/bench.json` or
  `RUN_DIR/bench.json`: onnxruntime fp32, all cores, batch 1), otherwise measured here on eager PyTorch
  (reparameterized, batch 1, all cores); the table says which;
- training curves: `curves.png` as the run wrote it, or drawn from `log.jsonl`.
Images are inlined as base64 PNG, so the page is one file to mail or attach to a pull request.
"""

import base64
import html
import io
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from distill.curves import curves_figure
from export.bench import eager_towers, latency_row, time_eager
from export.files import preprocess_json
from mdcore.atomic import write_text_atomic
from mdcore.errors import UserInputError, first_line
from mdcore.jsonio import read_json_file, read_jsonl_file
from mdmodels.model_dir import is_model_dir, read_provenance
from mdmodels.specs import load_model

__all__ = ["summarize_run", "write_report", "render_report", "pareto_front", "parameter_counts", "BENCH_LOCATIONS"]

BENCH_LOCATIONS = ("export/bench.json", "bench.json")


def summarize_run(run_dir: str | Path, latency_runs: int = 20) -> dict[str, Any]:
    """One row of the report: parameters, accuracy, latency per tower and where each number came from."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserInputError(f"run directory not found: {run_dir}")
    if not is_model_dir(run_dir):
        raise UserInputError(f"{run_dir} is not a model directory: open_clip_config.json is missing")
    provenance = read_provenance(run_dir)
    evaluation = provenance.get("evaluation") or {}
    row: dict[str, Any] = {"name": run_dir.name, "path": str(run_dir), **parameter_counts(run_dir),
                           "top1": evaluation.get("zeroshot", {}).get("top1"),
                           "retrieval_R@1": evaluation.get("retrieval", {}).get("image_to_text", {}).get("R@1"),
                           "text_to_image_R@1": evaluation.get("retrieval", {}).get("text_to_image", {}).get("R@1"),
                           "eval_split": evaluation.get("split"),
                           "student": (provenance.get("recipe") or {}).get("student"),
                           "steps": provenance.get("steps")}
    row.update(_latency(run_dir, latency_runs))
    return row


def parameter_counts(run_dir: Path) -> dict[str, int]:
    """Parameters of a model directory, all, image tower and the rest, read from its safetensors header."""
    weights = sorted(run_dir.glob("*.safetensors"))
    if not weights:
        raise UserInputError(f"model directory {run_dir} has no weights (expected open_clip_model.safetensors)")
    image = text = 0
    try:
        with safe_open(str(weights[0]), framework="pt") as f:
            for key in f.keys():
                numel = 1
                for dim in f.get_slice(key).get_shape():
                    numel *= dim
                if key.startswith("visual."):
                    image += numel
                elif not key.startswith("logit_"):
                    text += numel
    except (SafetensorError, OSError) as e:
        raise UserInputError(f"{weights[0]} is not a readable safetensors file: {first_line(e)}") from e
    return {"params": image + text, "image_params": image, "text_params": text}


def _latency(run_dir: Path, runs: int) -> dict[str, Any]:
    for location in BENCH_LOCATIONS:
        path = run_dir / location
        if path.is_file():
            rows = read_json_file(path).get("results", [])
            if not isinstance(rows, list) or not all(
                    isinstance(r, dict) and isinstance(r.get("median_ms"), int | float) and isinstance(
                        r.get("threads"), int) for r in rows):
                raise UserInputError(f"{path} does not hold bench results (each with median_ms and threads)")
            picked = {tower: latency_row(rows, tower) for tower in ("image", "text")}
            if picked["image"] is not None:
                return {"image_latency_ms": picked["image"]["median_ms"],
                        "text_latency_ms": (picked["text"] or {}).get("median_ms"),
                        "latency_source": f"onnxruntime fp32, {picked['image']['threads']} threads ({location})"}
    return _measure_eager(run_dir, runs)


def _measure_eager(run_dir: Path, runs: int) -> dict[str, Any]:
    loaded = load_model(f"local-dir:{run_dir}")
    towers = eager_towers(loaded)
    height, width = preprocess_json(loaded)["size"]
    image = torch.randn(1, 3, height, width)
    text = loaded.tokenizer(["a photo of a dog."]).to(torch.int32)
    threads = os.cpu_count() or 1
    image_ms = time_eager(towers["image"], image, threads, runs, 5)["median_ms"]
    text_ms = time_eager(towers["text"], text, threads, runs, 5)["median_ms"]
    return {"image_latency_ms": image_ms, "text_latency_ms": text_ms,
            "latency_source": f"torch eager, {threads} threads (measured by report, {runs} runs)"}


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both accuracy (higher) and image-tower latency (lower), fastest first."""
    scored = [r for r in rows if r.get("top1") is not None and r.get("image_latency_ms") is not None]
    front = []
    for r in sorted(scored, key=lambda r: (r["image_latency_ms"], -r["top1"])):
        if not front or r["top1"] > front[-1]["top1"]:
            front.append(r)
    return front


def _png_base64(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pareto_plot(rows: list[dict[str, Any]]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.get("top1") is not None and r.get("image_latency_ms") is not None]
    if not scored:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["image_latency_ms"] for r in scored], [100 * r["top1"] for r in scored], color="tab:blue")
    for r in scored:
        ax.annotate(r["name"], (r["image_latency_ms"], 100 * r["top1"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    front = pareto_front(rows)
    ax.step([r["image_latency_ms"] for r in front], [100 * r["top1"] for r in front], where="post",
            color="tab:red", label="Pareto front")
    ax.set_xlabel("image tower latency, batch 1 (ms)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    encoded = _png_base64(fig)
    plt.close(fig)
    return encoded


def _curves(run_dir: Path) -> str | None:
    """The run's own curves.png, else a loss plot drawn from log.jsonl, else None."""
    if (run_dir / "curves.png").is_file():
        return base64.b64encode((run_dir / "curves.png").read_bytes()).decode("ascii")
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return None
    rows = [r for r in read_jsonl_file(log) if isinstance(r.get("step"), int | float)
            and isinstance(r.get("loss"), int | float)]
    if not rows:
        return None
    import matplotlib.pyplot as plt

    fig = curves_figure(rows)
    encoded = _png_base64(fig)
    plt.close(fig)
    return encoded


def _cell(value: Any, percent: bool = False, digits: int = 2) -> str:
    if value is None:
        return "-"
    if percent:
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def write_report(run_dirs: list[str | Path], out: str | Path, latency_runs: int = 20, progress: bool = True
                 ) -> dict[str, Any]:
    """Write the HTML page to `out` (atomically) and return its data: `{"rows": [...], "pareto": [names]}`."""
    if not run_dirs:
        raise UserInputError("report needs at least one run directory")
    out = Path(out)
    for d in run_dirs:  # every input checked before any slow work
        if not is_model_dir(d):
            raise UserInputError(f"run directory not found: {d}" if not Path(d).is_dir()
                                 else f"{d} is not a model directory: open_clip_config.json is missing")
    rows = [summarize_run(d, latency_runs) for d in tqdm(run_dirs, desc="report", disable=not progress, leave=False)]
    names = [r["name"] for r in rows]
    for r in rows:  # two runs named alike (a/kd, b/kd) are told apart by their parent
        if names.count(r["name"]) > 1:
            r["name"] = f"{Path(r['path']).parent.name}/{r['name']}"
    write_text_atomic(out, render_report(rows))
    return {"rows": rows, "pareto": [r["name"] for r in pareto_front(rows)]}


def render_report(rows: list[dict[str, Any]], title: str = "mobiledistill report", intro_html: str = "") -> str:
    """The HTML page for rows as `summarize_run` makes them (name, path, params, image_params, text_params, top1,
    retrieval_R@1, text_to_image_R@1, image_latency_ms, text_latency_ms, latency_source)."""
    front = {r["name"] for r in pareto_front(rows)}
    plot = _pareto_plot(rows)

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}",
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}",
             "tr.front td:first-child{font-weight:bold}img{max-width:100%}small{color:#666}",
             f"</style></head><body><h1>{html.escape(title)}</h1>", intro_html,
             f"<p><small>{len(rows)} runs, written {html.escape(time.strftime('%Y-%m-%d %H:%M'))}. Bold: on the "
             "Pareto front of zero-shot top-1 against image-tower latency.</small></p>",
             "<table><tr><th>run</th><th>params (M)</th><th>image params (M)</th><th>text params (M)</th>"
             "<th>zero-shot top-1</th><th>R@1 image&rarr;text</th><th>R@1 text&rarr;image</th>"
             "<th>image ms</th><th>text ms</th><th>latency from</th></tr>"]
    for r in rows:
        parts.append(
            f"<tr class='{'front' if r['name'] in front else ''}'><td>{html.escape(r['name'])}</td>"
            f"<td>{r['params'] / 1e6:.2f}</td><td>{r['image_params'] / 1e6:.2f}</td><td>{r['text_params'] / 1e6:.2f}"
            f"</td><td>{_cell(r['top1'], True)}</td><td>{_cell(r['retrieval_R@1'], True)}</td>"
            f"<td>{_cell(r['text_to_image_R@1'], True)}</td><td>{_cell(r['image_latency_ms'])}</td>"
            f"<td>{_cell(r['text_latency_ms'])}</td><td><small>{html.escape(r['latency_source'])}</small></td></tr>")
    parts.append("</table>")
    if len({r["latency_source"].split(" (")[0] for r in rows}) > 1:
        parts.append("<p><b>Note:</b> latencies come from different sources (see the last column); compare like "
                     "with like.</p>")
    parts.append("<h2>Accuracy against image-tower latency</h2>")
    parts.append(f"<img alt='Pareto plot' src='data:image/png;base64,{plot}'>" if plot
                 else "<p>No run has both an evaluation and a latency.</p>")
    parts.append("<h2>Training curves</h2>")
    for r in rows:
        curves = _curves(Path(r["path"]))
        parts.append(f"<h3>{html.escape(r['name'])}</h3>")
        parts.append(f"<img alt='curves of {html.escape(r['name'])}' src='data:image/png;base64,{curves}'>"
                     if curves else "<p>No training log in this directory.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
