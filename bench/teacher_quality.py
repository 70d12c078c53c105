"""Foundation figures: time to build the emoji set, and the quality a teacher reaches in a few CPU minutes.

    python bench/teacher_quality.py --out runs/bench-teachers [--arch md-teacher-m --steps 150 --batch-size 128]
    python bench/teacher_quality.py --out runs/bench-teacher-seeds --arch md-teacher-s --seeds 0 1 2

Builds the full emoji dataset (timed), trains each teacher from its architecture on `train/`, evaluates it on
`test/` (and `test_noto/` when present), and prints a Markdown table for docs/BENCHMARKS.md. With several
`--seeds`, each teacher is trained once per seed (models in ARCH, then ARCH-seedN) and the table ends with each
split's mean and spread over them.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run(args: list[str]) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "distill", *args], check=True)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-teachers")
    parser.add_argument("--arch", action="append", default=None, help="architectures to train (repeatable)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (the first is the default)")
    args = parser.parse_args()
    archs = args.arch or ["md-teacher-s", "md-teacher-m"]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = out / "emoji"
    build_s = run(["data", "emoji", "--out", str(data)])
    manifest = json.loads((data / "manifest.json").read_text())
    splits = [s for s in ("test", "test_noto") if (data / s).is_dir()]

    rows = []
    for arch in archs:
        for seed in args.seeds:
            model_dir = out / (arch if seed == args.seeds[0] else f"{arch}-seed{seed}")
            train_s = run(["teachers", "train", "--data", str(data), "--arch", arch, "--out", str(model_dir),
                           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                           "--seed", str(seed), "--eval-split", "none"])
            for split in splits:
                result_file = out / f"{model_dir.name}-{split}.json"
                run(["eval", "--model", str(model_dir), "--data", str(data), "--split", split, "--json",
                     str(result_file)])
                rows.append((arch, seed, split, train_s, json.loads(result_file.read_text())))

    print(f"\nemoji dataset: {manifest['splits']} samples, {manifest['num_classes']} classes, built in {build_s:.1f} s")
    print(f"training: {args.steps} steps x batch {args.batch_size}, lr {args.lr}\n")
    print("| teacher | seed | split | train wall (s) | zero-shot top-1 | top-5 | chance | R@1 image->text | "
          "R@1 text->image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch, seed, split, train_s, r in rows:
        z, ret = r["zeroshot"], r["retrieval"]
        print(f"| {arch} | {seed} | {split} | {train_s:.0f} | {100 * z['top1']:.1f}% | {100 * z['top5']:.1f}% | "
              f"{100 / z['num_classes']:.1f}% | {100 * ret['image_to_text']['R@1']:.1f}% | "
              f"{100 * ret['text_to_image']['R@1']:.1f}% |")
    if len(args.seeds) > 1:
        print()
        for arch in archs:
            for split in splits:
                top1 = [100 * r["zeroshot"]["top1"] for a, _, s, _, r in rows if a == arch and s == split]
                print(f"{arch} {split}: zero-shot top-1 over seeds {args.seeds}: mean {statistics.mean(top1):.1f}%, "
                      f"sd {statistics.stdev(top1):.1f}, min {min(top1):.1f}%, max {max(top1):.1f}%")

if __name__ == "__main__":
    main()
