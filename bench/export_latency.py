"""Export and CPU latency: ONNX (fp32, int8) against PyTorch eager, batch 1, one thread and all cores.

    python bench/export_latency.py --out runs/bench-export [--runs 50]

Exports with `mobiledistill export --format onnx --quantize int8` and measures with `mobiledistill bench`, each
model in its own process, on:
  emoji student   the distilled md-student-tiny (bench/distill_quality.py's kd run), 64 px, with the emoji data
                  (real parity inputs, calibration and the int8 zero-shot top-1 change)
  emoji teacher   md-teacher-m, the stronger of its two teachers, 64 px, with the emoji data
  MobileCLIP2-S0, MobileCLIP-S2 (256 px), ViT-B-32 (224 px)   the architectures, random weights (latency does
                  not depend on the weights; no pretrained weights are reachable offline)
Beside each export it writes `*_encoder.fused.onnx`: the fp32 towers with self-attention fused into onnxruntime's
`Attention` op, as the int8 files are (`export.fusion`), so the table separates what fusion gains from what int8
gains. Prints the Markdown table recorded in docs/BENCHMARKS.md and the two goal ratios:
  fp32 ONNX student image tower / eager image tower     goal <= 0.7
  int8 ONNX text tower / fp32 ONNX text tower           goal <= 0.7
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

MODELS = {  # name: (spec, with the emoji data)
    "emoji student": ("runs/bench-distill/kd", True),
    "emoji teacher (md-teacher-m)": ("runs/bench-teachers/md-teacher-m", True),
    "MobileCLIP2-S0": ("MobileCLIP2-S0", False),
    "MobileCLIP-S2": ("MobileCLIP-S2", False),
    "ViT-B-32": ("ViT-B-32", False),
}


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "distill", *args], check=True)


def median(rows: list[dict], file: str, threads: int) -> float | None:
    return next((r["median_ms"] for r in rows if r["file"] == file and r["threads"] == threads), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-export")
    parser.add_argument("--data", default="runs/bench-teachers/emoji")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--only", action="append", default=None, help="model names to run (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    summary = {}
    for name, (spec, with_data) in MODELS.items():
        if args.only and name not in args.only:
            continue
        slug = name.split(" (")[0].replace(" ", "-")
        export_dir, bench_json = out / slug, out / f"{slug}.bench.json"
        if not (export_dir / "export_report.json").is_file():
            start = time.time()
            data = ["--data", args.data] if with_data else []
            cli("export", "--model", spec, "--out", str(export_dir), "--format", "onnx", "--quantize", "int8",
                "--overwrite", *data)
            print(f"{name}: export {time.time() - start:.0f} s", flush=True)
        for tower in ("image", "text"):
            fused = export_dir / f"{tower}_encoder.fused.onnx"
            if not fused.is_file() and not fuse_attention_file(export_dir / f"{tower}_encoder.onnx", fused):
                fused.unlink()  # nothing to fuse (a convolutional tower, a Hugging Face text tower)
        cli("bench", str(export_dir), "--json", str(bench_json), "--runs", str(args.runs), "--warmup",
            str(args.warmup))
        report = json.loads((export_dir / "export_report.json").read_text())
        rows = json.loads(bench_json.read_text())["results"]
        summary[name] = {"spec": spec, "rows": rows, "zeroshot": report.get("zeroshot"),
                         "files": {k: {m: v[m] for m in ("max_abs_diff", "min_cosine", "bytes", "method")
                                       if m in v} for k, v in report["files"].items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print("\n| model | tower | threads | eager ms | ONNX fp32 ms | fp32 fused ms | ONNX int8 ms | fp32 / eager | "
          "int8 / fp32 | int8 / fused fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, entry in summary.items():
        rows = entry["rows"]
        for tower in ("image", "text"):
            for threads in sorted({1, cores}):
                eager = median(rows, f"{tower}_encoder (eager)", threads)
                fp32 = median(rows, f"{tower}_encoder.onnx", threads)
                int8 = median(rows, f"{tower}_encoder.int8.onnx", threads)
                fused = median(rows, f"{tower}_encoder.fused.onnx", threads)
                fused_cells = ("-", "-") if fused is None else (f"{fused:.2f}", f"{int8 / fused:.2f}")
                print(f"| {name} | {tower} | {threads} | {eager:.2f} | {fp32:.2f} | {fused_cells[0]} | {int8:.2f} | "
                      f"{fp32 / eager:.2f} | {int8 / fp32:.2f} | {fused_cells[1]} |")
    print("\n| model | file | max abs diff | min cosine | MB | int8 method |")
    print("|---|---|---|---|---|---|")
    for name, entry in summary.items():
        for file, f in entry["files"].items():
            print(f"| {name} | {file} | {f['max_abs_diff']:.2e} | {f['min_cosine']:.6f} | {f['bytes'] / 1e6:.1f} | "
                  f"{f.get('method', '-')} |")
    for name, entry in summary.items():
        z = entry["zeroshot"]
        if z:
            print(f"{name}: zero-shot top-1 on {z['split']} fp32 {100 * z['fp32_top1']:.1f}%, int8 "
                  f"{100 * z['int8_top1']:.1f}% ({z['top1_change_points']:+.1f} points)")
    student = summary.get("emoji student")
    if student:
        rows = student["rows"]
        for threads in sorted({1, cores}):
            image = median(rows, "image_encoder.onnx", threads) / median(rows, "image_encoder (eager)", threads)
            int8 = median(rows, "text_encoder.int8.onnx", threads)
            text = int8 / median(rows, "text_encoder.onnx", threads)
            fused = median(rows, "text_encoder.fused.onnx", threads)
            print(f"goals, {threads} thread(s): student image fp32 ONNX / eager {image:.2f} (<= 0.7), "
                  f"int8 / fp32 ONNX text {text:.2f} (<= 0.7); int8 / fused fp32 text "
                  f"{'-' if fused is None else f'{int8 / fused:.2f}'}")


if __name__ == "__main__":
    main()
