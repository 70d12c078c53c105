"""`mobiledistill bench`: batch-1 latency of an export directory's encoders next to eager PyTorch.

Every file runs in its own runtime on the CPU with one thread and with all cores: `.onnx` in onnxruntime, `.pte` in
ExecuTorch and `.tflite` in LiteRT (both on XNNPACK, the kernels Android runs); the eager PyTorch towers the files
were exported from (reparameterized, as exported) run with the same thread counts. Warm-up runs are discarded;
median and p90 of the timed runs are reported, and each row's ratio to eager PyTorch for the same tower and thread
count. CoreML predictions are timed per compute unit on macOS only.
"""

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from export.exporter import REPORT_NAME
from export.runtimes import format_of, open_runner, unavailable_reason
from export.towers import ImageEncoder, TextEncoder, prepare_for_export
from mdcore.configs import MAX_IMAGE_SIDE
from mdcore.errors import UserInputError, first_line
from mdcore.jsonio import read_json_file
from mdcore.names import PREPROCESS, TOKENIZER
from mdcore.threads import torch_threads
from mdmodels.specs import LoadedModel, load_model

__all__ = ["BenchConfig", "bench_export", "eager_towers", "time_eager", "latency_row",
           "bench_image_input", "bench_text_input", "time_call", "format_bench_table",
           "COREML_ELSEWHERE"]

COREML_ELSEWHERE = ("CoreML latency needs macOS or a device: run `mobiledistill bench EXPORT_DIR` on a Mac (it times "
                    "each .mlpackage with compute units ALL and CPU_ONLY), or open the .mlpackage in Xcode and run a "
                    "Performance report on a connected iPhone.")


@dataclass
class BenchConfig:
    runs: int = 50
    warmup: int = 10
    threads: tuple[int, ...] | None = None  # None: (1, all cores)
    torch_eager: bool = True
    coreml: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.runs < 1 or self.warmup < 0:
            raise UserInputError("--runs must be at least 1 and --warmup at least 0")
        if self.threads is not None and (not self.threads or min(self.threads) < 1):
            raise UserInputError("thread counts must be positive")


def time_call(fn: Callable[[], Any], runs: int, warmup: int) -> dict[str, float]:
    """Median and p90 wall time of `fn()` in milliseconds over `runs` timed calls after `warmup` discarded ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    p90 = times[min(len(times) - 1, int(np.ceil(0.9 * len(times))) - 1)]
    return {"median_ms": statistics.median(times), "p90_ms": p90, "runs": runs}


def bench_export(export_dir: str | Path, config: BenchConfig | None = None) -> dict[str, Any]:
    """The `bench --json` result: `{"results": [{"file", "runtime", "threads", "batch", "median_ms", "p90_ms",
    ...}], ...}` for every encoder in `export_dir`."""
    config = config or BenchConfig()
    directory = Path(export_dir)
    if not directory.is_dir():
        raise UserInputError(f"export directory not found: {directory}")
    if not (directory / REPORT_NAME).is_file():
        raise UserInputError(f"{directory} is not a finished export: {REPORT_NAME} is missing")
    report = read_json_file(directory / REPORT_NAME)
    preprocess = read_json_file(directory / PREPROCESS)
    tokenizer = read_json_file(directory / TOKENIZER)
    if not isinstance(report.get("model"), str):
        raise UserInputError(f"{directory / REPORT_NAME} does not name the exported model")
    try:
        inputs = {"image": bench_image_input(preprocess), "text": bench_text_input(tokenizer)}
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserInputError(f"{directory}: preprocess.json or tokenizer.json is malformed ({first_line(e)})") from e
    threads = config.threads or tuple(sorted({1, os.cpu_count() or 1}))

    files = sorted(f for pattern in ("*_encoder*.onnx", "*_encoder*.pte", "*_encoder*.tflite")
                   for f in directory.glob(pattern))
    skipped = {}
    for f in files:
        reason = unavailable_reason(format_of(f))
        if reason:
            skipped[f.name] = reason
    files = [f for f in files if f.name not in skipped]
    eager = _eager_towers(report["model"], preprocess) if config.torch_eager else {}
    # Thread count outermost: ExecuTorch has one thread pool per process, reset when the count changes.
    jobs = [(f, t) for t in threads for f in files] + [(tower, t) for tower in eager for t in threads]
    results = []
    bar = tqdm(jobs, desc="bench", disable=not config.progress, leave=False)
    for target, num_threads in bar:
        if isinstance(target, Path):
            tower = target.name.split("_", 1)[0]
            bar.set_postfix_str(f"{target.name}, {num_threads} thread(s)")
            runner = open_runner(target, threads=num_threads)
            timing = time_call(lambda r=runner, x=inputs[tower]: r.run(x), config.runs, config.warmup)
            precision = "int8" if ".int8." in target.name else "fp32"
            results.append({"file": target.name, "runtime": runner.runtime, "tower": tower, "precision": precision,
                            "threads": num_threads, "batch": 1, **timing})
            del runner
        else:
            tower = target
            bar.set_postfix_str(f"torch {tower} tower, {num_threads} thread(s)")
            timing = time_eager(eager[tower], torch.from_numpy(inputs[tower]), num_threads, config.runs,
                                config.warmup)
            results.append({"file": f"{tower}_encoder (eager)", "runtime": "torch", "tower": tower,
                            "precision": "fp32", "threads": num_threads, "batch": 1, **timing})
    bar.close()

    eager_ms = {(r["tower"], r["threads"]): r["median_ms"] for r in results if r["runtime"] == "torch"}
    for row in results:
        reference = eager_ms.get((row["tower"], row["threads"]))
        row["ratio_to_torch"] = round(row["median_ms"] / reference, 4) if reference else None

    coreml: dict[str, Any]
    if not config.coreml or not list(directory.glob("*.mlpackage")):
        coreml = {"status": "skipped", "message": "no .mlpackage in the export" if config.coreml else "not asked"}
    elif platform.system() == "Darwin":
        coreml = {"status": "measured"}
        results += _bench_coreml(directory, inputs, config)
    else:
        coreml = {"status": "needs macOS", "message": COREML_ELSEWHERE}
    return {"results": results, "model": report["model"], "export_dir": str(directory), "coreml": coreml,
            "not_run": skipped,
            "eager_note": "torch rows: the reparameterized eager model in inference_mode, same thread count",
            "machine": {"system": platform.system(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
                        "processor": platform.processor()},
            "config": {"runs": config.runs, "warmup": config.warmup, "threads": list(threads)}}


def bench_image_input(preprocess: dict[str, Any]) -> np.ndarray:
    """The image `bench` feeds: batch 1 at the export's input size and in its input type (normalized float NCHW,
    or uint8 pixels NHWC), fixed random values (latency ignores them)."""
    height, width = preprocess["size"]
    if not all(type(v) is int and 1 <= v <= MAX_IMAGE_SIDE for v in (height, width)):
        raise ValueError(f"size {preprocess['size']!r} is not two sides in [1, {MAX_IMAGE_SIDE}]")
    rng = np.random.default_rng(0)
    if preprocess.get("image_input", "float") == "uint8":
        return rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8)
    return rng.standard_normal((1, 3, height, width)).astype(np.float32)


def bench_text_input(tokenizer: dict[str, Any]) -> np.ndarray:
    """A real caption's ids (the tokenizer's first worked example), padded to the context length."""
    length = tokenizer["context_length"]
    if not (type(length) is int and 1 <= length <= 16384):
        raise ValueError(f"context_length {length!r} is not in [1, 16384]")
    ids = np.zeros((1, length), dtype=np.int32)
    example = tokenizer["examples"][0]["ids"][:length]
    ids[0, : len(example)] = example
    return ids


def _eager_towers(spec: str, preprocess: dict[str, Any]) -> dict[str, torch.nn.Module]:
    """The eager towers the export was made from; none when the model can no longer be loaded (moved, offline)."""
    try:
        loaded = load_model(spec, warn_random=False)
    except UserInputError:
        return {}
    return eager_towers(loaded, preprocess.get("image_input", "float") == "uint8")


def eager_towers(loaded: LoadedModel, pixels: bool = False) -> dict[str, torch.nn.Module]:
    """A model's towers as export traces them (`prepare_for_export`), in eval mode: what eager latency means here.
    `pixels`: the image tower takes uint8 pixels and normalizes them itself."""
    model = prepare_for_export(loaded.model).model
    if pixels:
        mean, std = loaded.preprocess_cfg["mean"], loaded.preprocess_cfg["std"]
        image = ImageEncoder(model, mean, std, pixels=True)
    else:
        image = ImageEncoder(model)
    return {"image": image.eval(), "text": TextEncoder(model).eval()}


def time_eager(module: torch.nn.Module, example: torch.Tensor, threads: int, runs: int, warmup: int
               ) -> dict[str, float]:
    """`time_call` of an eager module on `threads` intra-op threads, under inference mode."""
    with torch_threads(threads), torch.inference_mode():
        return time_call(lambda: module(example), runs, warmup)


def latency_row(rows: list[dict[str, Any]], tower: str) -> dict[str, Any] | None:
    """The bench row a summary quotes for a tower's latency: onnxruntime, fp32, batch 1, with the most threads
    measured (the quickstart measures one thread only); None when the bench has no such row."""
    candidates = [r for r in rows if r.get("runtime") == "onnxruntime" and r.get("tower") == tower
                  and r.get("precision") == "fp32" and r.get("batch", 1) == 1]
    return max(candidates, key=lambda r: r.get("threads") or 0) if candidates else None


def _bench_coreml(directory: Path, inputs: dict[str, np.ndarray], config: BenchConfig) -> list[dict[str, Any]]:
    """CoreML predictions per compute unit (macOS only)."""
    import coremltools as ct

    rows = []
    for path in sorted(directory.glob("*_encoder.mlpackage")):
        tower = path.name.split("_", 1)[0]
        if tower == "image":
            height, width = inputs["image"].shape[2:]
            feed = {"image": Image.new("RGB", (width, height), (128, 128, 128))}
        else:
            feed = {"text": inputs["text"]}
        for units in ("ALL", "CPU_ONLY"):
            model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, units))
            timing = time_call(lambda m=model, f=feed: m.predict(f), config.runs, config.warmup)
            rows.append({"file": path.name, "runtime": "coreml", "compute_units": units, "tower": tower,
                         "precision": "see export_report.json", "threads": None, "batch": 1, **timing,
                         "ratio_to_torch": None})
    return rows


def format_bench_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table (what docs/BENCHMARKS.md records)."""
    lines = ["| file | runtime | threads | median ms | p90 ms | ratio to torch |", "|---|---|---|---|---|---|"]
    for r in result["results"]:
        ratio = "-" if r.get("ratio_to_torch") is None else f"{r['ratio_to_torch']:.2f}"
        threads = r.get("compute_units") or r["threads"]
        lines.append(f"| {r['file']} | {r['runtime']} | {threads} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{ratio} |")
    for name, reason in result.get("not_run", {}).items():
        lines += ["", f"{name}: not run ({reason})"]
    if result["coreml"]["status"] != "measured":
        lines.append("")
        lines.append(f"CoreML: {result['coreml'].get('message', result['coreml']['status'])}")
    return "\n".join(lines)
