"""Cost of one distillation step from a reinforced dataset against a plain CLIP step of the same student.

    python bench/train_step.py --teachers runs/bench-teachers --dr runs/bench-distill/dr --out runs/bench-step

Trains md-student-tiny for --steps steps of --batch-size in this one process, four ways, and times the steps after
the first --warmup (the loop's own clock: model loading, evaluation and writing are excluded):
  plain CLIP           `teachers train` on the raw emoji images (open_clip's recipe: random crop, CLIP loss)
  CLIP, reinforced     `distill` with the CLIP loss alone on the reinforced dataset's stored views
  KD, reinforced       `distill` with MobileCLIP's KD from the stored teacher embeddings (the default recipe)
  KD, online teachers  the same with both teachers run in the loop (`--online-teacher`), as open_clip/TinyCLIP do
Ratios are to the plain CLIP step, measured in one run. Goal: KD from the reinforced dataset at most 1.15x.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from distill.recipe import load_recipe  # noqa: E402
from distill.teacher_training import TeacherTrainConfig, train_teacher  # noqa: E402
from distill.train import distill  # noqa: E402


def seconds_per_step(rows: list[dict], warmup: int) -> float:
    timed = [r for r in rows if r["step"] >= warmup]
    first, last = timed[0], timed[-1]
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", default="runs/bench-teachers")
    parser.add_argument("--dr", default="runs/bench-distill/dr", help="reinforced emoji dataset (distill_quality.py)")
    parser.add_argument("--out", default="runs/bench-step")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    teachers, out = Path(args.teachers), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    steps, batch = args.steps, args.batch_size

    train_teacher("md-student-tiny", str(teachers / "emoji"), out / "plain-clip",
                  TeacherTrainConfig(steps=steps, batch_size=batch, warmup_steps=5, log_every=1), progress=False)
    plain = seconds_per_step(json.loads((out / "plain-clip" / "mobiledistill.json").read_text())["history"],
                             args.warmup)

    common = [f"steps={steps}", f"batch_size={batch}", "log_every=1", "warmup_steps=5", "eval_split=none"]
    runs = {
        "CLIP, reinforced": (["loss.w_kd=0.0", "loss.w_clip=1.0"], []),
        "KD, reinforced": ([], []),
        "KD, online teachers": ([], [str(teachers / "md-teacher-s"), str(teachers / "md-teacher-m")]),
    }
    per_step = {"plain CLIP (`teachers train`, raw images)": plain}
    for name, (overrides, online) in runs.items():
        config = load_recipe(Path(__file__).parents[1] / "recipes" / "emoji-kd.yaml", [*common, *overrides])
        config.online_teachers = online
        run = out / name.replace(", ", "-").replace(" ", "-")
        distill(args.dr, run, config, progress=False)
        rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        per_step[name] = seconds_per_step(rows, args.warmup)

    print(f"\nmd-student-tiny, batch {batch}, steps {args.warmup}-{steps - 1} timed, one process\n")
    print("| step | s/step | ratio to plain CLIP step |")
    print("|---|---|---|")
    for name, seconds in per_step.items():
        print(f"| {name} | {seconds:.3f} | {seconds / plain:.2f} |")


if __name__ == "__main__":
    main()
