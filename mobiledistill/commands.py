"""What each command of the `mobiledistill` command line runs: library calls and what the command prints.

`mobiledistill.cli` parses the arguments and imports this module only then, after it has quietened the libraries'
loggers and warnings, so `--help` and argument errors answer without loading torch.
"""

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from distill.evaluate import evaluate_model
from distill.recipe import load_recipe
from distill.teacher_training import load_teacher_recipe, train_teacher
from distill.train import distill
from export.bench import BenchConfig, bench_export, format_bench_table
from export.exporter import ExportConfig, export_model
from mdcore.atomic import write_json_atomic
from mdcore.configs import MAX_IMAGE_SIDE
from mdcore.errors import UserInputError
from mdcore.processes import process_state
from mdmodels import list_architectures, load_model, model_config_of, parse_model_spec, update_provenance
from mobiledistill.quickstart import format_summary, load_quickstart_recipe, quickstart, shipped_recipe
from mobiledistill.report import write_report
from mobiledistill.stages import is_staged, run_stages
from reinforced_data.augment import AugmentationConfig
from reinforced_data.emoji import build_emoji_dataset
from reinforced_data.inspection import inspect_reinforced, write_inspection_html
from teachers.extend import extend_reinforced
from teachers.reinforce import ReinforceConfig, reinforce


def _report_skips(skips: dict | None) -> None:
    """One line on stderr saying what a command could not read (`SkipLog.as_dict()`), when anything."""
    if skips and (skips["samples"] or skips["unreadable_shards"]):
        print(f"mobiledistill: {skips['summary']}", file=sys.stderr)


def _write_json(result: dict, path: str | None) -> None:
    if path:
        write_json_atomic(path, result)


def cmd_data_emoji(args: argparse.Namespace) -> int:
    if not 8 <= args.image_size <= MAX_IMAGE_SIDE:
        raise UserInputError(f"--image-size must be in [8, {MAX_IMAGE_SIDE}]")
    if args.limit is not None and args.limit <= 0:
        raise UserInputError("--limit must be positive")
    try:
        manifest = build_emoji_dataset(args.out, image_size=args.image_size, limit=args.limit, seed=args.seed)
    except FileExistsError as e:
        raise UserInputError(f"{args.out} already exists (delete it to rebuild)") from e
    splits = ", ".join(f"{name} {count}" for name, count in manifest["splits"].items())
    print(f"wrote {args.out}: {manifest['num_classes']} classes; {splits}")
    return 0


def cmd_teachers_list(args: argparse.Namespace) -> int:
    archs = list_architectures()
    if args.json:
        print(json.dumps(archs, indent=2))
        return 0
    print("shipped with mobiledistill:")
    for name in archs["mobiledistill"]:
        print(f"  {name}")
    print(f"open_clip architectures ({len(archs['open_clip'])}; add @TAG for pretrained weights):")
    for name in archs["open_clip"]:
        print(f"  {name}")
    return 0


def cmd_teachers_train(args: argparse.Namespace) -> int:
    overrides = [f"{key}={value}" for key, value in (
        ("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr), ("warmup_steps", args.warmup_steps),
        ("seed", args.seed), ("mixed_precision", args.mixed_precision), ("num_workers", args.num_workers))
        if value is not None]
    if args.unlock_text:
        overrides.append("lock_text=false")
    config = load_teacher_recipe(shipped_recipe(args.config) if args.config else None, overrides + args.overrides)
    summary = train_teacher(args.arch, args.data, args.out, config, split=args.split,
                            provenance={"command": " ".join(sys.argv)})
    if not process_state().is_main_process:  # under several processes, the main one reports
        return 0
    print(f"wrote {args.out}: {summary['steps']} steps in {summary['wall_s']} s, "
          f"final loss {summary['final_loss']:.3f}")
    _report_skips(summary["skips"])
    if args.eval_split != "none" and Path(args.data, args.eval_split).is_dir():
        result = evaluate_model(load_model(f"local-dir:{args.out}"), args.data, args.eval_split)
        update_provenance(args.out, evaluation=result)
        print(_eval_line(result))
    return 0


def _eval_line(result: dict) -> str:
    parts = [f"{result['model']} on {result['split']} ({result['num_samples']} samples):"]
    if "zeroshot" in result:
        z = result["zeroshot"]
        parts.append(f"zero-shot top-1 {100 * z['top1']:.1f}% top-5 {100 * z['top5']:.1f}% "
                     f"({z['num_classes']} classes, chance {100 / z['num_classes']:.1f}%);")
    r = result["retrieval"]
    parts.append(f"retrieval R@1 image->text {100 * r['image_to_text']['R@1']:.1f}% "
                 f"text->image {100 * r['text_to_image']['R@1']:.1f}%")
    return " ".join(parts)


def cmd_eval(args: argparse.Namespace) -> int:
    result = evaluate_model(load_model(args.model), args.data, args.split, batch_size=args.batch_size)
    _write_json(result, args.json)
    print(_eval_line(result))
    _report_skips(result["skips"])
    return 0


def cmd_reinforce(args: argparse.Namespace) -> int:
    if args.add_to is not None:
        return _add_to(args)
    missing = [flag for flag, value in (("--data", args.data), ("--teacher", args.teacher), ("--out", args.out))
               if not value]
    if missing:
        raise UserInputError(f"reinforce needs {', '.join(missing)} (or --add-to DR_DIR to extend a dataset)")
    if args.aug_size is not None and args.aug_size < 8:
        raise UserInputError("--aug-size must be at least 8")
    augmentation = AugmentationConfig(size=args.aug_size or _reference_size(args.teacher),
                                      scale=(args.crop_scale_min, 1.0), rand_augment=not args.no_rand_augment)
    config = ReinforceConfig(num_augs=args.num_augs, num_captions=args.num_captions, dtype=args.dtype, seed=args.seed,
                             batch_size=args.batch_size, store_images=not args.embeddings_only,
                             augmentation=augmentation, num_workers=args.num_workers,
                             compile_captioners=args.compile)
    result = reinforce(args.data, args.teacher, args.out, config, captioners=args.captioner or [], split=args.split)
    if result:  # only the main process writes the summary
        counts = result["counts"]
        print(f"wrote {args.out}: {counts['samples']} samples, {counts['skipped']} skipped, "
              f"{counts['bytes_per_sample'] / 1024:.1f} KiB per sample ({result['dtype']}, K={result['num_augs']}, "
              f"C={result['num_captions']}, {len(result['teachers'])} teachers)")
        _report_skips(result["skips"])
    return 0


def _add_to(args: argparse.Namespace) -> int:
    if args.data or args.out:
        raise UserInputError("--add-to extends DR_DIR in place: give neither --data nor --out")
    if len(args.captioner or []) + len(args.teacher or []) != 1:
        raise UserInputError("--add-to adds one --captioner SPEC:TAG or one --teacher SPEC at a time")
    result = extend_reinforced(args.add_to, captioner=(args.captioner or [None])[0],
                               teacher=(args.teacher or [None])[0], num_captions=args.num_captions,
                               images=args.images, batch_size=max(1, args.batch_size // max(1, args.num_captions)),
                               compile_step=args.compile)
    added = result["extensions"][-1]
    print(f"extended {args.add_to}: added {added['op']} {added['spec']} in {added['wall_s']} s "
          f"({len(result['teachers'])} teachers, caption sets: "
          f"{', '.join(s['key'] for s in result.get('caption_sets', [])) or 'none'})")
    return 0


def _reference_size(teacher_specs: list[str]) -> int:
    """Augment at the largest teacher input size, so no teacher sees an upsampled view."""

    sizes = []
    for spec in teacher_specs:
        size = model_config_of(parse_model_spec(spec)).get("vision_cfg", {}).get("image_size", 224)
        sizes.append(max(size) if isinstance(size, (list, tuple)) else int(size))
    return max(sizes)


def cmd_inspect(args: argparse.Namespace) -> int:
    summary = inspect_reinforced(args.path)
    print(json.dumps(summary, indent=2))
    _report_skips(summary.get("skips"))
    if args.html:
        write_inspection_html(args.path, args.html, images=args.images, num_samples=args.num_samples)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    for key, value in (("student", args.student), ("inherit_from", args.inherit_from), ("steps", args.steps),
                       ("save_every", args.save_every), ("batch_size", args.batch_size),
                       ("student_from", args.student_from), ("prune.target_sparsity", args.target_sparsity),
                       ("num_workers", args.num_workers)):
        if value is not None:
            overrides.append(f"{key}={value}")
    config = load_recipe(shipped_recipe(args.config) if args.config else None, overrides)
    args.paths.check(args, extra_inputs=(config.eval_data, config.student_from, config.inherit_from,
                                         *config.online_teachers))
    if args.online_teacher:
        config.online_teachers = list(args.online_teacher)
    run = run_stages if is_staged(config) else distill  # stages / masks: mobiledistill.stages
    summary = run(args.data, args.out, config, images=args.images, resume=args.resume, command=" ".join(sys.argv))
    if not process_state().is_main_process:  # under several processes, the main one reports
        return 0
    _report_skips(summary.get("skips"))
    if summary.get("evaluation"):
        print(_eval_line({**summary["evaluation"], "model": args.out}))
    print(f"wrote {args.out}: {summary['steps']} steps in {summary['wall_s']} s, "
          f"final loss {summary['final_loss']:.3f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    config = ExportConfig(formats=formats, quantize=args.quantize, data=args.data, split=args.split,
                          image_input=args.image_input, coreml_target=args.coreml_target,
                          coreml_compress=args.coreml_compress, overwrite=args.overwrite,
                          extra={"command": " ".join(sys.argv)})
    report = export_model(args.model, args.out, config)
    for name, entry in report["files"].items():
        if entry.get("kept") is False:
            continue
        parity = ("spec checked" if entry["min_cosine"] is None
                  else f"max abs diff {entry['max_abs_diff']:.2e}, min cosine {entry['min_cosine']:.6f}")
        print(f"  {name}: {entry['precision']}, {parity}")
        if entry.get("nodes_outside_delegate") is not None:
            ops = ", ".join(f"{op} x{n}" for op, n in entry["ops_outside_delegate"].items()) or "none"
            print(f"    {entry['nodes_outside_delegate']} nodes outside XNNPACK ({ops})")
    if report.get("zeroshot"):
        z = report["zeroshot"]
        pairs = ", ".join(f"{p['format']} {p['precision']} {100 * p['top1']:.1f}%" for p in z["pairs"])
        print(f"  zero-shot top-1 on {z['split']}: eager {100 * z['eager_top1']:.1f}%; {pairs}")
    if report.get("coreml_note"):
        print(f"  note: {report['coreml_note']}")
    print(f"wrote {args.out} in {report['wall_s']} s")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        threads = tuple(int(t) for t in args.threads.split(",")) if args.threads else None
    except ValueError as e:
        raise UserInputError(f"--threads takes comma-separated integers, not {args.threads!r}") from e
    result = bench_export(args.path, BenchConfig(runs=args.runs, warmup=args.warmup, threads=threads,
                                                 torch_eager=not args.no_torch))
    _write_json(result, args.json)
    print(format_bench_table(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.latency_runs < 1:
        raise UserInputError("--latency-runs must be at least 1")
    result = write_report(args.run_dirs, args.out, latency_runs=args.latency_runs)
    print(f"wrote {args.out}: {len(result['rows'])} runs; Pareto front: {', '.join(result['pareto']) or 'none'}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:

    config = load_quickstart_recipe(fast=args.fast)
    if args.distill_steps is not None and args.distill_steps <= 0:
        raise UserInputError("--distill-steps must be positive")
    changes = {"distill_steps": args.distill_steps, "seed": args.seed, "coreml": False if args.no_coreml else None}
    config = replace(config, **{k: v for k, v in changes.items() if v is not None})
    summary = quickstart(args.out, config)
    print()
    print(format_summary(summary))
    print(f"wrote {args.out}/summary.json and {args.out}/report.html")
    return 0


