"""Export and CPU latency: ONNX, ExecuTorch and LiteRT (fp32, int8) against PyTorch eager, batch 1, one thread and
all cores, with parity and zero-shot top-1 per file.

    python bench/export_latency.py --out runs/bench-export [--runs 50] [--only MobileCLIP2-S0]

Exports as `mobiledistill export --format onnx,executorch,litert --quantize int8` does (the fp32 max abs diff
bound at 2e-4 for MobileCLIP-S2, see FP32_MAX_ABS_DIFF) and measures with `mobiledistill bench`, each model in
its own process, on:
  emoji student   the student of `mobiledistill quickstart --fast` (made first when --quickstart holds none),
                  64 px, with its emoji data (real parity inputs, calibration, zero-shot top-1 per file)
  emoji teacher   md-teacher-m from the same quickstart, with the emoji data
  MobileCLIP2-S0, MobileCLIP-S2 (256 px), ViT-B-32 (224 px)   the architectures with random weights (latency does
                  not depend on them; no pretrained weights are reachable offline), their layer scales set to 1
                  so that the towers' outputs differ across inputs and parity can fail (timm starts them at 1e-5)
Beside each export it writes `*_encoder.fused.onnx`: the fp32 towers with self-attention fused into onnxruntime's
`Attention` op, as the int8 files are (`export.fusion`). Prints the Markdown tables recorded in docs/BENCHMARKS.md
and the goals:
  fp32 ONNX student image tower / eager image tower                      <= 0.7
  int8 ONNX text tower / fp32 ONNX text tower                            <= 0.7
  per model, the fastest phone-runtime int8 image tower / its own fp32   <= 0.7
  every file within its parity bound (the export fails otherwise); int8 zero-shot within 1 point of fp32
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export.fusion import fuse_attention_file  # noqa: E402

ARCHITECTURES = ("MobileCLIP2-S0", "MobileCLIP-S2", "ViT-B-32")
RUNTIMES = (("onnx", ".onnx", "onnxruntime"), ("executorch", ".pte", "executorch"), ("litert", ".tflite", "litert"))


# MobileCLIP-S2 with its layer scales at 1 is a deep convolutional stack whose random activations grow: its fp32
# ONNX graph lands at 1.19e-4 max abs diff from eager (min cosine 1.000000), over the 1e-4 default.
FP32_MAX_ABS_DIFF = {"MobileCLIP-S2": 2e-4}


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "distill", *args], check=True)


def export(model_dir: Path, out: Path, data: str | None, max_abs_diff: float) -> None:
    """`mobiledistill export --format onnx,executorch,litert --quantize int8 [--data]` with the fp32 bound given, in
    a process of its own."""
    config = {"formats": ["onnx", "executorch", "litert"], "quantize": "int8", "data": data, "overwrite": True,
              "fp32_max_abs_diff": max_abs_diff}
    code = ("import json, sys; from export import ExportConfig, export_model; "
            "export_model(sys.argv[1], sys.argv[2], ExportConfig(**json.loads(sys.argv[3])))")
    subprocess.run([sys.executable, "-c", code, str(model_dir), str(out), json.dumps(config)], check=True)


def median(rows: list[dict], file: str, threads: int) -> float | None:
    return next((r["median_ms"] for r in rows if r["file"] == file and r["threads"] == threads), None)


def varied_random_model(arch: str, target: Path) -> Path:
    """`arch` with random weights (seed 0) and its layer scales at 1, saved as a model directory."""
    if (target / "open_clip_config.json").is_file():
        return target
    import torch

    from export.towers import unit_layer_scales
    from mdmodels import load_model, save_model_dir

    torch.manual_seed(0)
    loaded = load_model(arch, warn_random=False)
    unit_layer_scales(loaded.model)
    return save_model_dir(loaded.model, loaded.model_cfg, target, tokenizer=loaded.tokenizer)


def cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-export")
    parser.add_argument("--quickstart", default="runs/qs-fast", help="a `quickstart --fast` directory (made if absent)")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--only", action="append", default=None, help="model names to run (default: all)")
    args = parser.parse_args()
    out, quick = Path(args.out), Path(args.quickstart)
    out.mkdir(parents=True, exist_ok=True)
    models = {"emoji student": (quick / "student", True), "emoji teacher (md-teacher-m)": (quick / "teacher-m", True),
              **{arch: (out / "models" / arch, False) for arch in ARCHITECTURES}}
    if not (args.only and all(n in ARCHITECTURES for n in args.only)) and not (quick / "summary.json").is_file():
        cli("quickstart", "--fast", "--out", str(quick))
    cores = os.cpu_count() or 1
    summary = {}
    for name, (model_dir, with_data) in models.items():
        if args.only and name not in args.only:
            continue
        if name in ARCHITECTURES:
            varied_random_model(name, model_dir)
        slug = name.split(" (")[0].replace(" ", "-")
        export_dir, bench_json = out / slug, out / f"{slug}.bench.json"
        if not (export_dir / "export_report.json").is_file():
            start = time.time()
            export(model_dir, export_dir, str(quick / "emoji") if with_data else None,
                   FP32_MAX_ABS_DIFF.get(name, 1e-4))
            print(f"{name}: export {time.time() - start:.0f} s", flush=True)
        for tower in ("image", "text"):
            fused = export_dir / f"{tower}_encoder.fused.onnx"
            if not fused.is_file() and not fuse_attention_file(export_dir / f"{tower}_encoder.onnx", fused):
                fused.unlink()  # nothing to fuse (a convolutional tower, a Hugging Face text tower)
        cli("bench", str(export_dir), "--json", str(bench_json), "--runs", str(args.runs), "--warmup",
            str(args.warmup))
        report = json.loads((export_dir / "export_report.json").read_text())
        rows = json.loads(bench_json.read_text())["results"]
        keys = ("max_abs_diff", "min_cosine", "bytes", "method", "nodes_outside_delegate", "ops_outside_delegate",
                "zeroshot_top1")
        summary[name] = {"model_dir": str(model_dir), "rows": rows, "zeroshot": report.get("zeroshot"),
                         "outputs_vary": report["parity_inputs"]["eager_outputs_vary"],
                         "files": {k: {m: v[m] for m in keys if m in v} for k, v in report["files"].items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print("\nms at batch 1; ratios are each phone runtime over onnxruntime for the same tower, precision and threads")
    print("\n| model | tower | threads | eager | ONNX fp32 | ONNX int8 | ExecuTorch fp32 | ExecuTorch int8 | "
          "LiteRT fp32 | LiteRT int8 | ET / ORT fp32 | ET / ORT int8 | LiteRT / ORT fp32 | LiteRT / ORT int8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, entry in summary.items():
        rows = entry["rows"]
        for tower in ("image", "text"):
            for threads in sorted({1, cores}):
                ms = {(fmt, p): median(rows, f"{tower}_encoder{'.int8' if p == 'int8' else ''}{suffix}", threads)
                      for fmt, suffix, _ in RUNTIMES for p in ("fp32", "int8")}

                def ratio(fmt, p, ms=ms):
                    a, b = ms[(fmt, p)], ms[("onnx", p)]
                    return None if a is None or b is None else a / b

                eager = median(rows, f"{tower}_encoder (eager)", threads)
                print(f"| {name} | {tower} | {threads} | {cell(eager)} | " + " | ".join(
                    cell(ms[(f, p)]) for f, _, _ in RUNTIMES for p in ("fp32", "int8")) + " | " + " | ".join(
                    cell(ratio(f, p)) for f in ("executorch", "litert") for p in ("fp32", "int8")) + " |")

    print("\n| model | file | max abs diff | min cosine | MB | int8 method | nodes outside XNNPACK | zero-shot top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, entry in summary.items():
        for file, f in entry["files"].items():
            outside = f.get("nodes_outside_delegate")
            ops = "" if not f.get("ops_outside_delegate") else " (" + ", ".join(
                f"{op} {n}" for op, n in f["ops_outside_delegate"].items()) + ")"
            top1 = "-" if f.get("zeroshot_top1") is None else f"{100 * f['zeroshot_top1']:.1f}%"
            print(f"| {name} | {file} | {f['max_abs_diff']:.2e} | {f['min_cosine']:.6f} | {f['bytes'] / 1e6:.1f} | "
                  f"{f.get('method', '-')} | {'-' if outside is None else f'{outside}{ops}'} | {top1} |")

    for name, entry in summary.items():
        vary = ", ".join(f"{t} {v['mean_pairwise_cosine']:.3f}" for t, v in entry["outputs_vary"].items())
        print(f"{name}: eager outputs' mean pairwise cosine over the parity inputs: {vary}")
        z = entry["zeroshot"]
        if z:
            pairs = {(p["format"], p["precision"]): p["top1"] for p in z["pairs"]}
            changes = ", ".join(f"{fmt} {100 * (pairs[(fmt, 'int8')] - pairs[(fmt, 'fp32')]):+.1f}"
                                for fmt, _, _ in RUNTIMES if (fmt, "int8") in pairs and (fmt, "fp32") in pairs)
            print(f"{name}: zero-shot top-1 on {z['split']}: eager {100 * z['eager_top1']:.1f}%; " + ", ".join(
                f"{fmt} {p} {100 * v:.1f}%" for (fmt, p), v in pairs.items()) + f"; int8 - fp32 points: {changes} "
                "(goal: within 1)")
        rows = entry["rows"]
        for threads in sorted({1, cores}):
            best = min(((median(rows, f"image_encoder.int8{suffix}", threads), fmt) for fmt, suffix, _ in RUNTIMES[1:]
                        if median(rows, f"image_encoder.int8{suffix}", threads) is not None), default=None)
            if best:
                fp32 = median(rows, f"image_encoder{dict((f, s) for f, s, _ in RUNTIMES)[best[1]]}", threads)
                print(f"goal, {name}, {threads} thread(s): fastest phone int8 image tower ({best[1]}) / its fp32 "
                      f"{best[0] / fp32:.2f} (<= 0.7)")
    student = summary.get("emoji student")
    if student:
        rows = student["rows"]
        for threads in sorted({1, cores}):
            image = median(rows, "image_encoder.onnx", threads) / median(rows, "image_encoder (eager)", threads)
            text = median(rows, "text_encoder.int8.onnx", threads) / median(rows, "text_encoder.onnx", threads)
            print(f"goals, {threads} thread(s): student image fp32 ONNX / eager {image:.2f} (<= 0.7), "
                  f"int8 / fp32 ONNX text {text:.2f} (<= 0.7)")


if __name__ == "__main__":
    main()
