"""The `mobiledistill` command line. It parses arguments and calls library functions; nothing else lives here.

Bad input (a missing file, a malformed spec, a dimension mismatch) is reported as one line on stderr with exit
status 2, never a traceback.
"""

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from mdcore.configs import MAX_IMAGE_SIDE
from mdcore.errors import UserInputError, first_line
from mdcore.paths import check_output
from mdcore.processes import process_state

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@dataclass(frozen=True)
class _Paths:
    """Which arguments of a command are inputs and which are outputs (directories filled, files written), so that
    no output can overwrite, delete or enclose an input (`mdcore.paths.check_output`)."""

    inputs: tuple[str, ...] = ()
    directories: tuple[tuple[str, str], ...] = ()  # (argument, flag)
    files: tuple[tuple[str, str], ...] = ()

    def check(self, args: argparse.Namespace, extra_inputs: tuple = ()) -> None:
        inputs = list(extra_inputs)
        for name in self.inputs:
            value = getattr(args, name, None)
            inputs.extend(value if isinstance(value, list) else [value])
        for outputs, kind in ((self.directories, "directory"), (self.files, "file")):
            for name, flag in outputs:
                if getattr(args, name, None):
                    check_output(getattr(args, name), inputs, option=flag, kind=kind)


def _report_skips(skips: dict | None) -> None:
    """One line on stderr saying what a command could not read (`SkipLog.as_dict()`), when anything."""
    if skips and (skips["samples"] or skips["unreadable_shards"]):
        print(f"mobiledistill: {skips['summary']}", file=sys.stderr)


def _write_json(result: dict, path: str | None) -> None:
    if path:
        from mdcore.atomic import write_json_atomic

        write_json_atomic(path, result)


# ----------------------------------------------------------------------------------------------------- commands


def _cmd_data_emoji(args: argparse.Namespace) -> int:
    from reinforced_data.emoji import build_emoji_dataset

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


def _cmd_teachers_list(args: argparse.Namespace) -> int:
    from teachers import list_architectures

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


def _cmd_teachers_train(args: argparse.Namespace) -> int:
    from distill.evaluate import evaluate_model
    from teachers import TeacherTrainConfig, load_model, train_teacher, update_provenance

    config = TeacherTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                warmup_steps=args.warmup_steps, seed=args.seed, mixed_precision=args.mixed_precision,
                                num_workers=args.num_workers)
    if args.unlock_text:
        config.lock_text = False
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


def _cmd_eval(args: argparse.Namespace) -> int:
    from distill.evaluate import evaluate_model
    from teachers import load_model

    result = evaluate_model(load_model(args.model), args.data, args.split, batch_size=args.batch_size)
    _write_json(result, args.json)
    print(_eval_line(result))
    _report_skips(result["skips"])
    return 0


def _cmd_reinforce(args: argparse.Namespace) -> int:
    from reinforced_data.augment import AugmentationConfig
    from reinforced_data.writer import ReinforceConfig, reinforce

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
                             augmentation=augmentation, num_workers=args.num_workers)
    result = reinforce(args.data, args.teacher, args.out, config, captioners=args.captioner or [], split=args.split)
    if result:  # only the main process writes the summary
        counts = result["counts"]
        print(f"wrote {args.out}: {counts['samples']} samples, {counts['skipped']} skipped, "
              f"{counts['bytes_per_sample'] / 1024:.1f} KiB per sample ({result['dtype']}, K={result['num_augs']}, "
              f"C={result['num_captions']}, {len(result['teachers'])} teachers)")
        _report_skips(result["skips"])
    return 0


def _add_to(args: argparse.Namespace) -> int:
    from reinforced_data.extend import extend_reinforced

    if args.data or args.out:
        raise UserInputError("--add-to extends DR_DIR in place: give neither --data nor --out")
    if len(args.captioner or []) + len(args.teacher or []) != 1:
        raise UserInputError("--add-to adds one --captioner SPEC:TAG or one --teacher SPEC at a time")
    result = extend_reinforced(args.add_to, captioner=(args.captioner or [None])[0],
                               teacher=(args.teacher or [None])[0], num_captions=args.num_captions,
                               images=args.images, batch_size=max(1, args.batch_size // max(1, args.num_captions)))
    added = result["extensions"][-1]
    print(f"extended {args.add_to}: added {added['op']} {added['spec']} in {added['wall_s']} s "
          f"({len(result['teachers'])} teachers, caption sets: "
          f"{', '.join(s['key'] for s in result.get('caption_sets', [])) or 'none'})")
    return 0


def _reference_size(teacher_specs: list[str]) -> int:
    """Augment at the largest teacher input size, so no teacher sees an upsampled view."""
    from teachers import model_config_of, parse_model_spec

    sizes = []
    for spec in teacher_specs:
        size = model_config_of(parse_model_spec(spec)).get("vision_cfg", {}).get("image_size", 224)
        sizes.append(max(size) if isinstance(size, (list, tuple)) else int(size))
    return max(sizes)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from reinforced_data.inspection import inspect_reinforced, write_inspection_html

    summary = inspect_reinforced(args.path)
    print(json.dumps(summary, indent=2))
    _report_skips(summary.get("skips"))
    if args.html:
        write_inspection_html(args.path, args.html, images=args.images, num_samples=args.num_samples)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from distill.recipe import load_recipe
    from distill.stages import is_staged, run_stages
    from distill.train import distill

    overrides = list(args.overrides)
    for key, value in (("student", args.student), ("inherit_from", args.inherit_from), ("steps", args.steps),
                       ("save_every", args.save_every), ("batch_size", args.batch_size),
                       ("student_from", args.student_from), ("prune.target_sparsity", args.target_sparsity),
                       ("num_workers", args.num_workers)):
        if value is not None:
            overrides.append(f"{key}={value}")
    config = load_recipe(args.config, overrides)
    args.paths.check(args, extra_inputs=(config.eval_data, config.student_from, config.inherit_from,
                                         *config.online_teachers))
    if args.online_teacher:
        config.online_teachers = list(args.online_teacher)
    run = run_stages if is_staged(config) else distill  # stages / masks: distill.stages
    summary = run(args.data, args.out, config, images=args.images, resume=args.resume, command=" ".join(sys.argv))
    if not process_state().is_main_process:  # under several processes, the main one reports
        return 0
    _report_skips(summary.get("skips"))
    if summary.get("evaluation"):
        print(_eval_line({**summary["evaluation"], "model": args.out}))
    print(f"wrote {args.out}: {summary['steps']} steps in {summary['wall_s']} s, "
          f"final loss {summary['final_loss']:.3f}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from export.exporter import ExportConfig, export_model

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


def _cmd_bench(args: argparse.Namespace) -> int:
    from export.bench import BenchConfig, bench_export, format_bench_table

    try:
        threads = tuple(int(t) for t in args.threads.split(",")) if args.threads else None
    except ValueError as e:
        raise UserInputError(f"--threads takes comma-separated integers, not {args.threads!r}") from e
    result = bench_export(args.path, BenchConfig(runs=args.runs, warmup=args.warmup, threads=threads,
                                                 torch_eager=not args.no_torch))
    _write_json(result, args.json)
    print(format_bench_table(result))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from export.report import write_report

    if args.latency_runs < 1:
        raise UserInputError("--latency-runs must be at least 1")
    result = write_report(args.run_dirs, args.out, latency_runs=args.latency_runs)
    print(f"wrote {args.out}: {len(result['rows'])} runs; Pareto front: {', '.join(result['pareto']) or 'none'}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from distill.quickstart import QuickstartConfig, format_summary, quickstart

    config = QuickstartConfig.fast() if args.fast else QuickstartConfig()
    if args.distill_steps is not None and args.distill_steps <= 0:
        raise UserInputError("--distill-steps must be positive")
    changes = {"distill_steps": args.distill_steps, "seed": args.seed, "coreml": False if args.no_coreml else None}
    config = replace(config, **{k: v for k, v in changes.items() if v is not None})
    summary = quickstart(args.out, config)
    print()
    print(format_summary(summary))
    print(f"wrote {args.out}/summary.json and {args.out}/report.html")
    return 0


# ------------------------------------------------------------------------------------------------------- parser


_WORKERS_HELP = "data workers per process, decoding and augmenting (default: the cores per process less one; 0: none)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mobiledistill", description="Distill big image-text models into small, fast ones.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = commands.add_parser("data", help="build datasets").add_subparsers(dest="dataset", required=True,
                                                                             parser_class=_Parser)
    emoji = data.add_parser("emoji", help="render the embedded OpenMoji dataset (a dataset root of shards)")
    emoji.add_argument("--out", required=True, help="dataset root to create")
    emoji.add_argument("--image-size", type=int, default=64)
    emoji.add_argument("--limit", type=int, default=None, help="build a small subset of about N emoji (tests)")
    emoji.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    emoji.set_defaults(func=_cmd_data_emoji, paths=_Paths(directories=(("out", "--out"),)))

    teachers = commands.add_parser("teachers", help="list or train teachers and captioners").add_subparsers(
        dest="teachers_command", required=True, parser_class=_Parser)
    listing = teachers.add_parser("list", help="shipped and open_clip architectures")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_cmd_teachers_list)
    train = teachers.add_parser("train", help="train (or fine-tune) a CLIP or CoCa model on image-text shards")
    train.add_argument("--data", required=True, help="dataset root, directory of .tar shards, or shard pattern")
    train.add_argument("--arch", required=True,
                       help="model spec: ARCH trains from scratch; ARCH@TAG, hf-hub: or a model directory fine-tunes")
    train.add_argument("--out", required=True, help="model directory to write")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--split", default="train", help="split of a dataset root to train on")
    train.add_argument("--eval-split", default="test",
                       help="split of a dataset root to evaluate on afterwards ('none' skips it)")
    train.add_argument("--unlock-text", action="store_true", help="also train a pretrained Hugging Face text tower")
    train.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    train.add_argument("--num-workers", type=int, default=None, help=_WORKERS_HELP)
    train.set_defaults(func=_cmd_teachers_train, paths=_Paths(("data", "arch"), (("out", "--out"),)))

    ev = commands.add_parser("eval", help="zero-shot classification and retrieval on a dataset root's split")
    ev.add_argument("--model", required=True, help="model spec")
    ev.add_argument("--data", required=True, help="dataset root")
    ev.add_argument("--split", default="test")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--json", default=None, help="write the result as JSON to this file")
    ev.set_defaults(func=_cmd_eval, paths=_Paths(("model", "data"), files=(("json", "--json"),)))

    rf = commands.add_parser("reinforce", help="write a reinforced dataset: teacher embeddings of stored augmentations "
                                              "and synthetic captions")
    rf.add_argument("--data", default=None, help="image-text shards: dataset root, directory or shard pattern")
    rf.add_argument("--split", default="train", help="split of a dataset root")
    rf.add_argument("--teacher", action="append", default=None, help="teacher model spec (repeat for an ensemble)")
    rf.add_argument("--captioner", action="append", default=None, metavar="SPEC[:TAG]",
                    help="CoCa model spec, with the tag of its caption set syn_text_<TAG> (repeatable)")
    rf.add_argument("--num-augs", type=int, default=10, help="augmentations stored per image (K)")
    rf.add_argument("--num-captions", type=int, default=5, help="synthetic captions per image and captioner (C)")
    rf.add_argument("--out", default=None, help="reinforced dataset directory")
    rf.add_argument("--add-to", default=None, metavar="DR_DIR",
                    help="add one --captioner SPEC:TAG or one --teacher SPEC to this finished dataset, in place")
    rf.add_argument("--images", default=None, help="with --add-to: image shards of an embeddings-only dataset")
    rf.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16", "int8"])
    rf.add_argument("--seed", type=int, default=0)
    rf.add_argument("--batch-size", type=int, default=256, help="augmented views per teacher forward pass")
    rf.add_argument("--aug-size", type=int, default=None,
                    help="reference size of augmented views (default: the largest teacher input size)")
    rf.add_argument("--crop-scale-min", type=float, default=0.08, help="RandomResizedCrop's smallest area fraction")
    rf.add_argument("--no-rand-augment", action="store_true", help="crops only")
    rf.add_argument("--embeddings-only", action="store_true", help="do not copy images (join them by key later)")
    rf.add_argument("--num-workers", type=int, default=None, help=_WORKERS_HELP)
    rf.set_defaults(func=_cmd_reinforce, paths=_Paths(("data", "teacher", "captioner", "images", "add_to"),
                                                      (("out", "--out"),)))

    ins = commands.add_parser("inspect", help="summarize a reinforced dataset (ours or Apple's DataCompDR)")
    ins.add_argument("path", help="reinforced dataset directory or shard pattern")
    ins.add_argument("--images", default=None, help="image-text shards to join by key (for embeddings-only data)")
    ins.add_argument("--html", default=None, help="also write a self-contained HTML page of replayed samples")
    ins.add_argument("--num-samples", type=int, default=12, help="samples shown in the HTML page")
    ins.set_defaults(func=_cmd_inspect, paths=_Paths(("path", "images"), files=(("html", "--html"),)))

    ds = commands.add_parser("distill", help="distill a student from a reinforced dataset")
    ds.add_argument("--data", required=True, help="reinforced dataset directory (or image-text data with "
                    "--online-teacher)")
    ds.add_argument("--images", default=None, help="image-text shards to join by key (embeddings-only datasets)")
    ds.add_argument("--student", default=None, help="student architecture (default: the recipe's)")
    ds.add_argument("--out", required=True, help="run directory (becomes an open_clip model directory)")
    ds.add_argument("--inherit-from", default=None, help="model spec to inherit weights from (TinyCLIP's manual rule)")
    ds.add_argument("--online-teacher", action="append", default=None, metavar="SPEC",
                    help="run this teacher in the loop instead of the stored embeddings (repeat for an ensemble); "
                         "--data may then be plain image-text shards")
    ds.add_argument("--student-from", default=None, metavar="SPEC",
                    help="start the student as a copy of this model (teacher or earlier stage); with "
                         "--target-sparsity, learned masks prune it (automatic inheritance)")
    ds.add_argument("--target-sparsity", type=float, default=None,
                    help="fraction of the source's counted parameters (prune.count) to remove (recipe key "
                         "prune.target_sparsity)")
    ds.add_argument("--config", "--recipe", dest="config", default=None,
                    help="recipe YAML (recipes/*.yaml); a recipe with stages runs them in order")
    ds.add_argument("--steps", type=int, default=None)
    ds.add_argument("--batch-size", type=int, default=None)
    ds.add_argument("--save-every", type=int, default=None, help="save_state checkpoint every N steps")
    ds.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    ds.add_argument("--num-workers", type=int, default=None, help=_WORKERS_HELP + " (recipe key num_workers)")
    ds.add_argument("overrides", nargs="*", help="recipe overrides, key=value (e.g. loss.w_kd=0.5)")
    ds.set_defaults(func=_cmd_distill, paths=_Paths(
        ("data", "images", "student", "inherit_from", "online_teacher", "student_from", "config"), (("out", "--out"),)))

    ex = commands.add_parser("export", help="export the image and text towers to ONNX / CoreML / ExecuTorch / "
                                            "LiteRT, checked against PyTorch")
    ex.add_argument("--model", required=True, help="model spec (a model directory, ARCH, ARCH@TAG, hf-hub:...)")
    ex.add_argument("--out", required=True, help="export directory to create")
    ex.add_argument("--format", default="onnx,coreml",
                    help="comma-separated: onnx, coreml, executorch, litert (default: onnx,coreml)")
    ex.add_argument("--quantize", default=None, choices=["int8"], help="also write int8 towers in every format but "
                                                                       "CoreML (see --coreml-compress)")
    ex.add_argument("--image-input", default="float", choices=["float", "uint8"],
                    help="float: normalized NCHW float32 (default); uint8: RGB pixels NHWC, normalized in the graph")
    ex.add_argument("--data", default=None,
                    help="dataset root: real parity inputs, int8 calibration images and the zero-shot top-1 change")
    ex.add_argument("--split", default="test", help="split of --data for parity inputs and zero-shot accuracy")
    ex.add_argument("--coreml-target", default="iOS17", help="CoreML minimum deployment target")
    ex.add_argument("--coreml-compress", default=None, choices=["palettize", "int8"],
                    help="CoreML weight compression: 6-bit k-means palettization or int8 linear")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    ex.set_defaults(func=_cmd_export, paths=_Paths(("model", "data"), (("out", "--out"),)))

    bn = commands.add_parser("bench", help="batch-1 latency of an export directory (onnxruntime vs PyTorch eager)")
    bn.add_argument("path", help="export directory (what `mobiledistill export` wrote)")
    bn.add_argument("--json", default=None, help="write the result as JSON to this file")
    bn.add_argument("--runs", type=int, default=50, help="timed runs per row (after the warm-up)")
    bn.add_argument("--warmup", type=int, default=10, help="discarded warm-up runs per row")
    bn.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all cores)")
    bn.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager rows")
    bn.set_defaults(func=_cmd_bench, paths=_Paths(("path",), files=(("json", "--json"),)))

    rp = commands.add_parser("report", help="one HTML page comparing runs: accuracy, latency, Pareto plot, curves")
    rp.add_argument("run_dirs", nargs="+", help="run or model directories")
    rp.add_argument("--out", required=True, help="HTML file to write")
    rp.add_argument("--latency-runs", type=int, default=20,
                    help="timed runs when a run has no bench JSON and latency is measured on PyTorch eager")
    rp.set_defaults(func=_cmd_report, paths=_Paths(("run_dirs",), files=(("out", "--out"),)))

    qs = commands.add_parser("quickstart", help="the whole pipeline on the embedded emoji default: data, teachers, "
                                                "reinforced dataset, distilled student and baseline, export, table")
    qs.add_argument("--out", required=True, help="directory for every stage (a finished stage is reused)")
    qs.add_argument("--fast", action="store_true", help="toy sizes: checks the pipeline in a few minutes")
    qs.add_argument("--no-coreml", action="store_true", help="skip the CoreML packages")
    qs.add_argument("--distill-steps", type=int, default=None, help="steps of the student and of the baseline")
    qs.add_argument("--seed", type=int, default=None)
    qs.set_defaults(func=_cmd_quickstart, paths=_Paths(directories=(("out", "--out"),)))
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Recipe overrides (key=value) may stand anywhere among distill's options, not only in one run.
    if extra and getattr(args, "overrides", None) is not None and all("=" in x and not x.startswith("-")
                                                                       for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Libraries log download failures and the like through the root logger; the command reports them itself.
    logging.basicConfig(level=os.environ.get("MOBILEDISTILL_LOG_LEVEL", "CRITICAL").upper())
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's import-time deprecation notices
    warnings.formatwarning = _one_line_warning
    for noisy in ("torch", "timm", "webdataset", "transformers", "huggingface_hub", "accelerate"):
        warnings.filterwarnings("ignore", module=noisy)
    try:
        if getattr(args, "paths", None) is not None:
            args.paths.check(args)
        return args.func(args) or 0
    except UserInputError as e:
        print(f"mobiledistill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mobiledistill: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a full disk, a permission denied: the environment, not a bug
        print(f"mobiledistill: error: {first_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
