"""Wall time and final table of `mobiledistill quickstart`, from an empty directory, as a newcomer runs it.

    python bench/quickstart.py --out runs/bench-quickstart            # the full run (target: at most 15 minutes)
    python bench/quickstart.py --out runs/bench-quickstart-fast --fast  # the smoke run (target: at most 3 minutes)

Runs the console command in a fresh process (interpreter start and imports included) into --out, which must not
exist, then prints the wall time, each stage's time and the quickstart's own table from summary.json as Markdown.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="quickstart directory to create")
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} exists: the measurement starts from nothing")
    command = [sys.executable, "-m", "distill", "quickstart", "--out", str(out)] + (["--fast"] if args.fast else [])
    start = time.time()
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    wall = time.time() - start
    if result.returncode != 0:
        print(result.stdout[-3000:])
        return result.returncode
    summary = json.loads((out / "summary.json").read_text())
    print(f"whole command: {wall:.0f} s ({wall / 60:.1f} min); quickstart's own clock {summary['wall_s']:.0f} s\n")
    print("| stage | wall (s) |\n|---|---|")
    for name, seconds in summary["stage_wall_s"].items():
        print(f"| {name} | {seconds:.0f} |")
    print("\n| model | role | params (M) | image params (M) | test top-1 | test_noto top-1 | R@1 image->text | "
          "image ms (ONNX, 1 thread) | speed-up vs teacher-m |\n|---|---|---|---|---|---|---|---|---|")
    for r in summary["rows"]:
        noto = r.get("test_noto_top1")
        print(f"| {r['name']} | {r['role']} | {r['params'] / 1e6:.2f} | {r['image_params'] / 1e6:.2f} | "
              f"{100 * r['top1']:.1f}% | {'-' if noto is None else f'{100 * noto:.1f}%'} | "
              f"{100 * r['retrieval_R@1']:.1f}% | {r['image_latency_ms']:.2f} | {r['speedup_vs_teacher_m']:.1f}x |")
    checks = summary["checks"]
    print(f"\nstudent - baseline: {checks['student_minus_baseline_points']:+.1f} points; student / teacher-m: "
          f"{checks['student_over_teacher_m_top1']:.0%}; image tower speed-up: "
          f"{checks['student_image_speedup_vs_teacher_m']:.1f}x; int8 zero-shot change: "
          f"{summary['export']['int8_zeroshot_change_points']:+.1f} points; CoreML: {summary['export']['coreml']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
