"""The `mobiledistill` command line: the arguments of every command and their checks. What each command runs is
in `mobiledistill.commands`, imported once the arguments parse.

Bad input (a missing file, a malformed spec, a dimension mismatch) is reported as one line on stderr with exit
status 2, never a traceback.
"""

import argparse
import logging
import os
import sys
import warnings
from dataclasses import dataclass

from mdcore.errors import UserInputError, first_line
from mdcore.paths import check_output

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
    emoji.set_defaults(func="cmd_data_emoji", paths=_Paths(directories=(("out", "--out"),)))

    teachers = commands.add_parser("teachers", help="list or train teachers and captioners").add_subparsers(
        dest="teachers_command", required=True, parser_class=_Parser)
    listing = teachers.add_parser("list", help="shipped and open_clip architectures")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func="cmd_teachers_list")
    train = teachers.add_parser("train", help="train (or fine-tune) a CLIP or CoCa model on image-text shards")
    train.add_argument("--data", required=True, help="dataset root, directory of .tar shards, or shard pattern")
    train.add_argument("--arch", required=True,
                       help="model spec: ARCH trains from scratch; ARCH@TAG, hf-hub: or a model directory fine-tunes")
    train.add_argument("--out", required=True, help="model directory to write")
    train.add_argument("--config", default=None,
                       help="teacher-training recipe (YAML, or a shipped one's name: emoji-teacher); flags and "
                            "key=value overrides win over it")
    train.add_argument("--steps", type=int, default=None, help="default 1000")
    train.add_argument("--batch-size", type=int, default=None, help="default 128")
    train.add_argument("--lr", type=float, default=None, help="default 1e-3")
    train.add_argument("--warmup-steps", type=int, default=None, help="default 100")
    train.add_argument("--seed", type=int, default=None, help="default 0")
    train.add_argument("--split", default="train", help="split of a dataset root to train on")
    train.add_argument("--eval-split", default="test",
                       help="split of a dataset root to evaluate on afterwards ('none' skips it)")
    train.add_argument("--unlock-text", action="store_true", help="also train a pretrained Hugging Face text tower")
    train.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"], help="default no")
    train.add_argument("--num-workers", type=int, default=None, help=_WORKERS_HELP)
    train.add_argument("overrides", nargs="*", help="recipe overrides, key=value (e.g. weight_decay=0.2)")
    train.set_defaults(func="cmd_teachers_train", paths=_Paths(("data", "arch", "config"), (("out", "--out"),)))

    ev = commands.add_parser("eval", help="zero-shot classification and retrieval on a dataset root's split")
    ev.add_argument("--model", required=True, help="model spec")
    ev.add_argument("--data", required=True, help="dataset root")
    ev.add_argument("--split", default="test")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--json", default=None, help="write the result as JSON to this file")
    ev.set_defaults(func="cmd_eval", paths=_Paths(("model", "data"), files=(("json", "--json"),)))

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
    rf.add_argument("--compile", action="store_true",
                    help="torch.compile the captioners' decoding step: faster captions after a compile of seconds to "
                         "a minute (sampled captions are then those of the compiled kernels)")
    rf.set_defaults(func="cmd_reinforce", paths=_Paths(("data", "teacher", "captioner", "images", "add_to"),
                                                      (("out", "--out"),)))

    ins = commands.add_parser("inspect", help="summarize a reinforced dataset (ours or Apple's DataCompDR)")
    ins.add_argument("path", help="reinforced dataset directory or shard pattern")
    ins.add_argument("--images", default=None, help="image-text shards to join by key (for embeddings-only data)")
    ins.add_argument("--html", default=None, help="also write a self-contained HTML page of replayed samples")
    ins.add_argument("--num-samples", type=int, default=12, help="samples shown in the HTML page")
    ins.set_defaults(func="cmd_inspect", paths=_Paths(("path", "images"), files=(("html", "--html"),)))

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
    ds.set_defaults(func="cmd_distill", paths=_Paths(
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
    ex.set_defaults(func="cmd_export", paths=_Paths(("model", "data"), (("out", "--out"),)))

    bn = commands.add_parser("bench", help="batch-1 latency of an export directory (onnxruntime vs PyTorch eager)")
    bn.add_argument("path", help="export directory (what `mobiledistill export` wrote)")
    bn.add_argument("--json", default=None, help="write the result as JSON to this file")
    bn.add_argument("--runs", type=int, default=50, help="timed runs per row (after the warm-up)")
    bn.add_argument("--warmup", type=int, default=10, help="discarded warm-up runs per row")
    bn.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all cores)")
    bn.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager rows")
    bn.set_defaults(func="cmd_bench", paths=_Paths(("path",), files=(("json", "--json"),)))

    rp = commands.add_parser("report", help="one HTML page comparing runs: accuracy, latency, Pareto plot, curves")
    rp.add_argument("run_dirs", nargs="+", help="run or model directories")
    rp.add_argument("--out", required=True, help="HTML file to write")
    rp.add_argument("--latency-runs", type=int, default=20,
                    help="timed runs when a run has no bench JSON and latency is measured on PyTorch eager")
    rp.set_defaults(func="cmd_report", paths=_Paths(("run_dirs",), files=(("out", "--out"),)))

    qs = commands.add_parser("quickstart", help="the whole pipeline on the embedded emoji default: data, teachers, "
                                                "reinforced dataset, distilled student and baseline, export, table")
    qs.add_argument("--out", required=True, help="directory for every stage (a finished stage is reused)")
    qs.add_argument("--fast", action="store_true", help="toy sizes: checks the pipeline in a few minutes")
    qs.add_argument("--no-coreml", action="store_true", help="skip the CoreML packages")
    qs.add_argument("--distill-steps", type=int, default=None, help="steps of the student and of the baseline")
    qs.add_argument("--seed", type=int, default=None)
    qs.set_defaults(func="cmd_quickstart", paths=_Paths(directories=(("out", "--out"),)))
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
        from mobiledistill import commands  # after the loggers and warnings above: the libraries load here

        return getattr(commands, args.func)(args) or 0
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
