"""Weight inheritance against half the steps, over seeds: does an inherited student reach, in half the steps, the
final zero-shot top-1 of the same student trained from its initialization?

    python bench/inherit_seeds.py --student md-student-minilm --out runs/inherit-seeds/md-student-minilm
    python bench/inherit_seeds.py --student md-student-tiny --inherit-lr 2e-3 --out runs/inherit-seeds/md-student-tiny

Both arms distill from bench/distill_quality.py's reinforced dataset (md-teacher-s + md-teacher-m, K=5) with
`recipes/emoji-kd.yaml` plus CLIP-KD feature distillation towards md-teacher-m (`loss.w_feature=4000
loss.reference_teacher=1`, as the quickstart does), batch 128, evaluated on test/ every 50 steps:
  ref-sN   --steps STEPS from the student's initialization, seed N
  inh-sN   --steps STEPS/2 with --inherit-from md-teacher-m (TinyCLIP's manual inheritance), seed N
One evaluation of 508 test images moves 2-6 points between seeds, so the comparison is of means over seeds. Runs
already finished in --out are reused. Prints one row per run and the mean and standard deviation of each arm.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path


def finished(run: Path) -> bool:
    return (run / "mobiledistill.json").is_file()


def result(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    info = json.loads((run / "mobiledistill.json").read_text())
    return {"top1": 100 * info["evaluation"]["zeroshot"]["top1"], "loss": rows[-1]["loss"],
            "curve": [(r["step"] + 1, 100 * r["eval_top1"]) for r in rows if "eval_top1" in r]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", default="runs/bench-teachers")
    parser.add_argument("--dr", default="runs/bench-distill/dr")
    parser.add_argument("--student", default="md-student-minilm")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=300, help="the reference's steps; inherited runs get half")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--inherit-lr", type=float, default=None, help="the inherited arm's lr (default: --lr)")
    args = parser.parse_args()
    teachers, out = Path(args.teachers), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--data", args.dr, "--student", args.student, "--config", "recipes/emoji-kd.yaml", "--batch-size",
              "128", "eval_every=50", f"eval_data={teachers / 'emoji'}", "save_every=0", "loss.w_feature=4000",
              "loss.reference_teacher=1"]
    arms = {"ref": ["--steps", str(args.steps), f"lr={args.lr}"],
            "inh": ["--steps", str(args.steps // 2), "--inherit-from", str(teachers / "md-teacher-m"),
                    f"lr={args.inherit_lr or args.lr}"]}
    for seed in args.seeds:
        for arm, extra in arms.items():
            run = out / f"{arm}-s{seed}"
            if not finished(run):
                shutil.rmtree(run, ignore_errors=True)  # an interrupted run of this script starts over
                with open(out / f"{arm}-s{seed}.log", "w") as log:
                    subprocess.run([sys.executable, "-m", "distill", "distill", *common, *extra, f"seed={seed}",
                                    "--out", str(run)], check=True, stdout=log, stderr=log)
            print(f"{run.name}: {result(run)['top1']:.1f}%", flush=True)

    print(f"\n{args.student}: reference {args.steps} steps, inherited from md-teacher-m {args.steps // 2} steps\n")
    print("| arm | steps | seed | final top-1 | final loss | curve (step: top-1) |")
    print("|---|---|---|---|---|---|")
    means = {}
    for arm, steps in (("ref", args.steps), ("inh", args.steps // 2)):
        results = [result(out / f"{arm}-s{seed}") for seed in args.seeds]
        for seed, r in zip(args.seeds, results):
            curve = ", ".join(f"{s}: {t:.1f}" for s, t in r["curve"])
            print(f"| {arm} | {steps} | {seed} | {r['top1']:.1f}% | {r['loss']:.2f} | {curve} |")
        tops = [r["top1"] for r in results]
        means[arm] = statistics.mean(tops)
        spread = statistics.stdev(tops) if len(tops) > 1 else 0.0
        print(f"| {arm} mean | {steps} | {len(tops)} seeds | **{means[arm]:.1f}%** (sd {spread:.1f}) | | |")
    verdict = "reaches" if means["inh"] >= means["ref"] else "misses"
    print(f"\ninherited at {args.steps // 2} steps {verdict} the {args.steps}-step reference: "
          f"{means['inh']:.1f}% vs {means['ref']:.1f}% (mean over {len(args.seeds)} seeds)")


if __name__ == "__main__":
    main()
