"""How stable an int8 / fp32 latency ratio is: `mobiledistill bench` repeated on one export directory.

    python bench/int8_ratio_repeats.py runs/bench-export/emoji-student [--repeats 8] [--runs 300]

A single bench run gives one median per file; on a shared two-core machine the ratio of two medians moves by a few
hundredths from run to run, which decides a goal such as "int8 text tower at most 0.7x the fp32 one" when the ratio
sits near it. Each repeat runs `mobiledistill bench --no-torch` in its own process (fresh onnxruntime sessions and
thread pools); printed per tower and thread count: every repeat's int8 / fp32 ratio, their mean, min and max.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    ratios: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):
            result_path = Path(work) / f"{repeat}.json"
            done = subprocess.run([sys.executable, "-m", "distill", "bench", args.export_dir, "--no-torch", "--runs",
                                   str(args.runs), "--json", str(result_path)], capture_output=True, text=True)
            if done.returncode:  # its progress bars are not shown; its error is
                sys.exit(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode)
            rows = json.loads(result_path.read_text())["results"]
            median = {(r["file"], r["threads"]): r["median_ms"] for r in rows}
            for (file, threads), int8_ms in median.items():
                fp32_ms = median.get((file.replace(".int8", ""), threads))
                if ".int8." in file and fp32_ms:
                    tower = file.split("_", 1)[0]
                    ratios.setdefault((tower, threads), []).append(int8_ms / fp32_ms)
    print(f"int8 / fp32 ONNX latency, {args.repeats} repeats of `mobiledistill bench {args.export_dir} --no-torch "
          f"--runs {args.runs}`")
    print("| tower | threads | ratio per repeat | mean | min | max |")
    print("|---|---|---|---|---|---|")
    for (tower, threads), values in sorted(ratios.items()):
        print(f"| {tower} | {threads} | {' '.join(f'{v:.2f}' for v in values)} | {statistics.mean(values):.3f} | "
              f"{min(values):.3f} | {max(values):.3f} |")


if __name__ == "__main__":
    main()
