"""Distillation quality on the embedded default: same student, same steps, same CPU.

    python bench/distill_quality.py --teachers runs/bench-teachers --out runs/bench-distill [--steps 300]

Uses the two teachers trained by bench/teacher_quality.py (md-teacher-s, md-teacher-m) and their emoji dataset.
Writes a reinforced dataset (both teachers, K views, no captioner unless --captioner), then trains md-student-tiny
four ways for the same number of steps and batch size, evaluating zero-shot top-1 on test/ every --eval-every steps:
  baseline      CLIP loss alone on the raw images (`teachers train`)
  kd            MobileCLIP KD from the reinforced dataset, random init
  kd+inherit    the same, starting from md-teacher-s's weights (TinyCLIP manual inheritance)
  clip+inherit  CLIP loss on the reinforced views, inherited (what inheritance alone gives)
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "distill", *args], check=True)
    return time.time() - start


def curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    points = [(r["step"] + 1, r["eval_top1"]) for r in rows if "eval_top1" in r]
    final = json.loads((run / "mobiledistill.json").read_text())["evaluation"]["zeroshot"]["top1"]
    return points + [(rows[-1]["step"] + 1, final)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", default="runs/bench-teachers")
    parser.add_argument("--out", default="runs/bench-distill")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-augs", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--captioner", default=None)
    args = parser.parse_args()
    teachers, out = Path(args.teachers), Path(args.out)
    data = teachers / "emoji"
    out.mkdir(parents=True, exist_ok=True)
    dr = out / "dr"
    if not (dr / "config.json").exists():
        captions = ["--captioner", args.captioner, "--num-captions", "5"] if args.captioner else ["--num-captions", "0"]
        reinforce_s = cli("reinforce", "--data", str(data), "--teacher", str(teachers / "md-teacher-s"), "--teacher",
                          str(teachers / "md-teacher-m"), *captions, "--num-augs", str(args.num_augs),
                          "--crop-scale-min", "0.35", "--out", str(dr))
        print(f"reinforce: {reinforce_s:.0f} s")
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), f"eval_every={args.eval_every}",
              f"eval_data={data}"]
    runs = {
        "kd": ["--config", "recipes/emoji-kd.yaml"],
        "kd+inherit": ["--config", "recipes/emoji-kd.yaml", "--inherit-from", str(teachers / "md-teacher-s")],
        "clip+inherit": ["--config", "recipes/emoji-kd.yaml", "--inherit-from", str(teachers / "md-teacher-s"),
                         "loss.w_kd=0.0", "loss.w_clip=1.0"],
    }
    walls = {}
    for name, extra in runs.items():
        run = out / name
        if not (run / "open_clip_config.json").exists():
            walls[name] = cli("distill", "--data", str(dr), "--student", "md-student-tiny", "--out", str(run),
                              *extra, *common)
    baseline = out / "baseline"
    if not baseline.exists():
        walls["baseline"] = cli("teachers", "train", "--data", str(data), "--arch", "md-student-tiny", "--out",
                                str(baseline), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                                "--warmup-steps", "30")
    base = json.loads((baseline / "mobiledistill.json").read_text())["evaluation"]
    print(f"\nmd-student-tiny, {args.steps} steps x {args.batch_size}, test zero-shot top-1 over 98 classes\n")
    print("| run | top-1 | R@1 i->t | curve (step: top-1) | wall (s) |")
    print("|---|---|---|---|---|")
    print(f"| baseline (CLIP loss, raw images) | {100 * base['zeroshot']['top1']:.1f}% | "
          f"{100 * base['retrieval']['image_to_text']['R@1']:.1f}% | - | {walls.get('baseline', float('nan')):.0f} |")
    for name in runs:
        run = out / name
        evaluation = json.loads((run / "mobiledistill.json").read_text())["evaluation"]
        points = ", ".join(f"{s}: {100 * t:.1f}" for s, t in curve(run))
        print(f"| {name} | {100 * evaluation['zeroshot']['top1']:.1f}% | "
              f"{100 * evaluation['retrieval']['image_to_text']['R@1']:.1f}% | {points} | "
              f"{walls.get(name, float('nan')):.0f} |")


if __name__ == "__main__":
    main()
