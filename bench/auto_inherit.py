"""Automatic against manual weight inheritance on the embedded default, at the same parameter count and steps.

    python bench/auto_inherit.py --teachers runs/bench-teachers --dr runs/bench-distill/dr --out runs/bench-auto \
        [--manual runs/bench-distill/kd+inherit] [--steps 300] [--stages 0.25] [--count layers]

  manual  md-student-tiny inherited from md-teacher-s (TinyCLIP's manual rule: evenly spaced layers, first channels
          and heads), KD from the reinforced dataset for --steps steps (reused from --manual when that run has the
          same steps and batch size)
  auto    a copy of md-teacher-s pruned by learned masks to md-student-tiny's parameter count (counted on the
          --count basis: "layers", the transformer layers' attention and MLP matrices, or "all" tower parameters;
          the target sparsity is computed, not chosen), through the intermediate targets given by --stages, the
          same KD and the same total steps (recipes/emoji-auto-inherit.yaml with the stages rewritten)

Both are evaluated (test zero-shot top-1), exported to ONNX and benchmarked (batch-1 latency, onnxruntime, one
thread), beside md-teacher-s itself. Prints a markdown table. With --seeds N M ..., both arms are trained once per
seed (the first seed's runs keep the names manual/ and auto/, the others get -sN) and a second table gives each
arm's top-1 per seed with its mean and standard deviation; latency and layout are those of the first seed.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cli(*args: str) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "distill", *args], check=True, cwd=REPO)
    return time.time() - start


def param_counts(model_dir_or_arch: str) -> dict[str, int]:
    """Parameters on both bases of `distill.prune.counted_parameters`: {"all": ..., "layers": ...}."""
    import open_clip

    import mdmodels  # noqa: F401  (shipped architectures, variable-width towers)
    from distill.prune import COUNT_BASES, counted_parameters

    if Path(model_dir_or_arch).is_dir():
        model = open_clip.create_model_and_transforms(f"local-dir:{model_dir_or_arch}")[0]
    else:
        model = open_clip.create_model(model_dir_or_arch)
    return {basis: counted_parameters(model, basis) for basis in COUNT_BASES}


def latency(model_dir: Path, out: Path, runs: int) -> dict[str, float]:
    export_dir = out / f"{model_dir.name}-export"
    if not (export_dir / "export_report.json").is_file():
        cli("export", "--model", str(model_dir), "--out", str(export_dir), "--format", "onnx", "--overwrite")
    result_path = out / f"{model_dir.name}-bench.json"
    cli("bench", str(export_dir), "--threads", "1", "--runs", str(runs), "--json", str(result_path))
    rows = json.loads(result_path.read_text())["results"]
    return {r["file"]: r["median_ms"] for r in rows if r["runtime"] == "onnxruntime"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", default="runs/bench-teachers")
    parser.add_argument("--dr", default="runs/bench-distill/dr")
    parser.add_argument("--manual", default=None, help="an existing kd+inherit run to reuse (same steps and batch)")
    parser.add_argument("--out", default="runs/bench-auto")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--stages", default="0.25", help="comma-separated intermediate targets before the final one")
    parser.add_argument("--prune-at", type=float, default=0.67, help="fraction of each stage's steps masked")
    parser.add_argument("--lambda-lr", type=float, default=None, help="override prune.lambda_lr of the recipe")
    parser.add_argument("--count", default="layers", choices=["layers", "all"],
                        help="which parameters the sparsity counts (recipe key prune.count)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train both arms once per seed")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--latency-runs", type=int, default=100)
    args = parser.parse_args()
    teachers, out = Path(args.teachers), Path(args.out)
    data, teacher = teachers / "emoji", teachers / "md-teacher-s"
    out.mkdir(parents=True, exist_ok=True)

    student_counts, teacher_counts = param_counts("md-student-tiny"), param_counts(str(teacher))
    student_params, teacher_params = student_counts[args.count], teacher_counts[args.count]
    target = round(1 - student_params / teacher_params, 4)
    walls = {}

    intermediate = [float(x) for x in args.stages.split(",") if x.strip()]
    targets = intermediate + [target]
    per_stage = [args.steps // len(targets)] * len(targets)
    per_stage[-1] += args.steps - sum(per_stage)
    recipe = yaml.safe_load((REPO / "recipes" / "emoji-auto-inherit.yaml").read_text())
    recipe["batch_size"] = args.batch_size
    recipe["prune"]["prune_at"] = args.prune_at
    recipe["prune"]["count"] = args.count
    if args.lambda_lr is not None:
        recipe["prune"]["lambda_lr"] = args.lambda_lr
    recipe["stages"] = [{"steps": n, "prune": {"target_sparsity": q}} for n, q in zip(per_stage, targets)]

    runs = {}  # seed -> (manual run, automatic run)
    for i, seed in enumerate(args.seeds):
        suffix = "" if i == 0 else f"-s{seed}"
        manual = Path(args.manual) if args.manual and i == 0 else out / f"manual{suffix}"
        recorded = json.loads((manual / "mobiledistill.json").read_text())["recipe"] if manual.is_dir() else {}
        if recorded and (recorded["steps"], recorded["batch_size"], recorded.get("seed", 0)) != \
                (args.steps, args.batch_size, seed):
            manual = out / f"manual{suffix}"
        if not (manual / "open_clip_config.json").is_file():
            walls[manual.name] = cli(
                "distill", "--data", args.dr, "--student", "md-student-tiny", "--out", str(manual), "--config",
                "recipes/emoji-kd.yaml", "--inherit-from", str(teacher), "--steps", str(args.steps), "--batch-size",
                str(args.batch_size), f"eval_every={args.eval_every}", f"eval_data={data}", f"seed={seed}")
        recipe_path = out / f"auto-recipe{suffix}.yaml"
        recipe_path.write_text("# written by bench/auto_inherit.py\n" +
                               yaml.safe_dump({**recipe, "seed": seed}, sort_keys=False))
        auto = out / f"auto{suffix}"
        if not (auto / "open_clip_config.json").is_file():
            walls[auto.name] = cli("distill", "--data", args.dr, "--student-from", str(teacher), "--recipe",
                                   str(recipe_path), "--out", str(auto), *(["--resume"] if auto.exists() else []),
                                   f"eval_every={args.eval_every}", f"eval_data={data}")
        runs[seed] = (manual, auto)
    manual, auto = runs[args.seeds[0]]

    rows = []
    for name, model_dir in (("md-teacher-s (the source)", teacher), ("manual inheritance (md-student-tiny)", manual),
                            ("automatic inheritance", auto)):
        provenance = json.loads((model_dir / "mobiledistill.json").read_text())
        evaluation = provenance.get("evaluation") or {}
        prune = provenance.get("prune") or {}
        ms = latency(model_dir, out, args.latency_runs)
        rows.append((name, param_counts(str(model_dir)), prune, evaluation, ms, provenance))

    print(f"\ncounting {args.count!r} parameters: md-teacher-s {teacher_params}, md-student-tiny {student_params}; "
          f"target sparsity 1 - {student_params}/{teacher_params} = {target:.4f}; stage targets {targets}, "
          f"{per_stage} steps, {args.prune_at:.2f} of each stage masked; batch {args.batch_size}\n")
    print("| model | layer params | tower params | sparsity (target / achieved) | test top-1 | R@1 i->t | "
          "image ONNX ms | text ONNX ms | train wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, counts, prune, evaluation, ms, provenance in rows:
        params = counts[args.count]
        zeroshot = evaluation.get("zeroshot") or {}
        retrieval = (evaluation.get("retrieval") or {}).get("image_to_text") or {}
        sparsity = (f"{prune['target_sparsity']:.3f} / {prune['achieved_sparsity']:.3f}" if prune
                    else f"- / {1 - params / teacher_params:.3f}")
        wall = sum(s.get("wall_s") or 0 for s in provenance.get("stages", [])) or \
            (provenance.get("train") or {}).get("wall_s", float("nan"))
        print(f"| {name} | {counts['layers']} | {counts['all']} | {sparsity} | "
              f"{100 * zeroshot.get('top1', float('nan')):.1f}% | "
              f"{100 * retrieval.get('R@1', float('nan')):.1f}% | {ms.get('image_encoder.onnx', float('nan')):.2f} | "
              f"{ms.get('text_encoder.onnx', float('nan')):.2f} | {wall:.0f} |")
    for name, _, prune, _, _, provenance in rows:
        for stage in provenance.get("stages", []):
            print(f"  {name} stage {stage['stage']}: target {stage['target_sparsity']:.3f}, achieved "
                  f"{stage['achieved_sparsity']:.3f}, {stage['params']} params, "
                  f"top-1 {100 * (stage['top1'] or 0):.1f}%")
        if prune.get("layout"):
            for tower, layout in prune["layout"].items():
                print(f"  {name} {tower}: width {layout['width']}/{layout['from_width']}, heads "
                      f"{layout['layer_heads']}, MLP {layout['layer_mlp_widths']}")
    if len(args.seeds) > 1:
        print("\n| arm | " + " | ".join(f"seed {seed}" for seed in args.seeds) + " | mean | sd |")
        print("|---|" + "---|" * (len(args.seeds) + 2))
        for arm, name in ((0, "manual"), (1, "automatic")):
            tops = [100 * json.loads((runs[seed][arm] / "mobiledistill.json").read_text())["evaluation"]["zeroshot"]
                    ["top1"] for seed in args.seeds]
            print(f"| {name} | " + " | ".join(f"{t:.1f}%" for t in tops) +
                  f" | **{statistics.mean(tops):.1f}%** | {statistics.stdev(tops):.1f} |")
    print(f"\nwall: {walls}")


if __name__ == "__main__":
    main()
