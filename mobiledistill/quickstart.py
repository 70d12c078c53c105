"""`mobiledistill quickstart`: the whole job on the embedded emoji default, offline, on a laptop-class CPU.

Stages, each in its own directory under DIR and reused when its finished output is there (delete a stage's
directory to redo it; an interrupted distillation resumes from its last checkpoint):

1. `emoji/`: the emoji dataset (train, test, and test_noto when Noto Color Emoji is installed);
2. `teacher-m/`, `teacher-s/`, `captioner/`: two teachers of different sizes and a tiny CoCa captioner, trained
   here because no pretrained weights are reachable offline;
3. `reinforced/`: the training set reinforced with the two-teacher ensemble and the captioner (MobileCLIP);
4. `student/`: the student distilled with the KD recipe, inheriting from the larger teacher (TinyCLIP's manual
   inheritance); `baseline/`: the same student trained with the CLIP loss alone, for the same steps;
5. `eval/`: zero-shot top-1 and retrieval of every model on `test/` (and `test_noto/`);
6. `export/`: the student exported to ONNX (fp32, int8) and CoreML with parity checks; every model's image tower
   exported to ONNX and timed with onnxruntime (one thread, batch 1);
7. `summary.json`, `report.html` and a table on stdout.
"""

import dataclasses
import html
import time
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distill.evaluate import evaluate_model, load_eval_data
from distill.recipe import DistillConfig, LossWeights
from distill.teacher_training import load_teacher_recipe, train_teacher
from distill.train import distill
from export.bench import BenchConfig, bench_export, latency_row
from export.coreml import coreml_unavailable_reason
from export.exporter import ExportConfig, export_model
from mdcore.atomic import write_json_atomic, write_text_atomic
from mdcore.configs import check_range, check_types
from mdcore.errors import UserInputError
from mdcore.jsonio import read_json_file
from mdcore.recipes import read_recipe_file, typed_value
from mdmodels.model_dir import is_model_dir
from mdmodels.specs import load_model
from mobiledistill.report import parameter_counts, render_report
from reinforced_data.emoji import build_emoji_dataset
from teachers.reinforce import ReinforceConfig, reinforce

__all__ = ["QuickstartConfig", "load_quickstart_recipe", "shipped_recipe", "quickstart", "format_summary"]

ROLES = {"teacher-m": "teacher", "teacher-s": "teacher", "student": "student", "baseline": "baseline"}


RECIPES = Path(__file__).parent / "recipes"  # shipped with the package; `recipes/` in a checkout


def shipped_recipe(name: str | Path) -> Path:
    """A recipe path, or the name of one shipped in mobiledistill/recipes (`emoji-kd`, `emoji-kd.yaml`)."""
    path = Path(name)
    if path.is_file() or path.parent != Path("."):
        return path
    shipped = RECIPES / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return shipped if shipped.is_file() else path


@dataclass
class QuickstartConfig:
    """The size of every stage: recipes/quickstart.yaml (`load_quickstart_recipe`); its comments say what each is."""

    limit: int | None
    teacher_recipe: str
    batch_size: int
    teacher_m_steps: int
    teacher_s_steps: int
    teacher_lr: float
    captioner_steps: int
    captioner_batch_size: int
    captioner_lr: float
    num_augs: int
    num_captions: int
    caption_max_len: int
    student: str
    distill_steps: int
    lr: float
    w_feature: float
    eval_every: int
    bench_runs: int
    coreml: bool
    seed: int

    def __post_init__(self):
        check_types(self)
        for name in ("batch_size", "teacher_m_steps", "teacher_s_steps", "captioner_steps", "captioner_batch_size",
                     "num_augs", "distill_steps", "bench_runs"):
            check_range(name, getattr(self, name), 1)
        for name in ("num_captions", "eval_every", "caption_max_len", "seed"):
            check_range(name, getattr(self, name), 0)
        check_range("limit", self.limit, 1)


def load_quickstart_recipe(path: str | Path = "quickstart", fast: bool = False) -> QuickstartConfig:
    """The quickstart recipe at `path` (default: the shipped one), with its `fast` keys applied when asked."""
    data = read_recipe_file(shipped_recipe(path))
    fast_keys = data.pop("fast", {})
    if not isinstance(fast_keys, dict):
        raise UserInputError(f"{path}: `fast` must be a mapping of quickstart keys")
    fields = {f.name for f in dataclasses.fields(QuickstartConfig)}
    unknown = sorted(set(data) - fields) + sorted(set(fast_keys) - fields)
    missing = sorted(fields - set(data))
    if unknown or missing:
        raise UserInputError(f"{path}: " + "; ".join(
            ([f"unknown quickstart keys: {', '.join(unknown)}"] if unknown else [])
            + ([f"missing quickstart keys: {', '.join(missing)}"] if missing else [])))
    if fast:
        data.update(fast_keys)
    hints = typing.get_type_hints(QuickstartConfig)
    return QuickstartConfig(**{name: typed_value(value, hints[name], name) for name, value in data.items()})


class _Stages:
    """Runs named stages in order, printing what each did and how long it took."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.done, self.log, self.times = total, 0, log, {}

    def run(self, name: str, finished: bool, fn: Callable[[], Any], where: Path | str) -> None:
        self.done += 1
        if finished:
            self.log(f"[{self.done}/{self.total}] {name}: reusing {where}")
            self.times[name] = 0.0
            return
        self.log(f"[{self.done}/{self.total}] {name} -> {where}")
        start = time.time()
        fn()
        self.times[name] = round(time.time() - start, 1)
        self.log(f"[{self.done}/{self.total}] {name}: {self.times[name]:.0f} s")


def quickstart(out_dir: str | Path, config: QuickstartConfig | None = None, progress: bool = True,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or finish) the quickstart in `out_dir`; writes and returns `summary.json`'s content."""
    config = config or load_quickstart_recipe()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    stages = _Stages(11, log)
    data = out / "emoji"
    stages.run("emoji dataset", (data / "manifest.json").is_file(),
               lambda: build_emoji_dataset(data, limit=config.limit, seed=config.seed, progress=progress), data)

    def teacher(arch: str, steps: int, name: str, batch_size: int, lr: float) -> None:
        recipe = load_teacher_recipe(shipped_recipe(config.teacher_recipe), [
            f"steps={steps}", f"batch_size={batch_size}", f"lr={lr}", f"warmup_steps={max(1, min(100, steps // 4))}",
            f"seed={config.seed}"])
        train_teacher(arch, str(data), out / name, recipe, progress=progress,
                      provenance={"command": "mobiledistill quickstart", "stage": name})

    for arch, steps, name, batch, lr in (
            ("md-teacher-m", config.teacher_m_steps, "teacher-m", config.batch_size, config.teacher_lr),
            ("md-teacher-s", config.teacher_s_steps, "teacher-s", config.batch_size, config.teacher_lr),
            ("md-coca-tiny", config.captioner_steps, "captioner", config.captioner_batch_size, config.captioner_lr)):
        stages.run(f"train {name} ({arch}, {steps} steps of {batch})", is_model_dir(out / name),
                   lambda a=arch, s=steps, n=name, b=batch, r=lr: teacher(a, s, n, b, r), out / name)

    reinforced = out / "reinforced"
    stages.run(f"reinforce (K={config.num_augs} views, C={config.num_captions} captions)",
               (reinforced / "config.json").is_file(),
               lambda: reinforce(str(data), [f"local-dir:{out / 'teacher-m'}", f"local-dir:{out / 'teacher-s'}"],
                                 reinforced, ReinforceConfig(num_augs=config.num_augs, num_captions=config.num_captions,
                                                             caption_max_len=config.caption_max_len, seed=config.seed),
                                 captioners=[f"local-dir:{out / 'captioner'}"], progress=progress), reinforced)

    student = out / "student"
    recipe = DistillConfig(student=config.student, inherit_from=f"local-dir:{out / 'teacher-m'}",
                           steps=config.distill_steps, batch_size=config.batch_size, lr=config.lr,
                           warmup_steps=max(1, config.distill_steps // 10), seed=config.seed,
                           eval_every=config.eval_every, save_every=max(1, config.distill_steps // 4),
                           loss=LossWeights(w_clip=0.0, w_kd=1.0, w_feature=config.w_feature, reference_teacher=0))
    stages.run(f"distill {config.student} ({config.distill_steps} steps, KD, inheriting from teacher-m)",
               is_model_dir(student),
               lambda: distill(str(reinforced), student, recipe, resume=student.exists(), progress=progress,
                               command="mobiledistill quickstart"), student)
    stages.run(f"baseline {config.student} ({config.distill_steps} steps, CLIP loss)", is_model_dir(out / "baseline"),
               lambda: teacher(config.student, config.distill_steps, "baseline", config.batch_size, config.teacher_lr),
               out / "baseline")  # the teachers' recipe: CLIP loss on the raw images

    splits = ["test"] + (["test_noto"] if (data / "test_noto").is_dir() else [])
    evals = out / "eval"

    def evaluate_all() -> None:
        evals.mkdir(exist_ok=True)
        for split in splits:
            todo = [n for n in ROLES if not (evals / f"{n}.{split}.json").is_file()]
            eval_data = load_eval_data(data, split) if todo else None
            for name in tqdm(todo, desc=f"eval {split}", disable=not progress, leave=False):
                loaded = load_model(f"local-dir:{out / name}", warn_random=False)
                write_json_atomic(evals / f"{name}.{split}.json",
                                  evaluate_model(loaded, data, split, progress=False, data=eval_data))

    stages.run(f"evaluate on {', '.join(splits)}", all((evals / f"{n}.{s}.json").is_file() for n in ROLES
                                                        for s in splits), evaluate_all, evals)

    exports = out / "export"
    coreml_note = _coreml_note(config.coreml)
    stages.run("export the student (ONNX fp32 + int8" + (", CoreML" if coreml_note is None else "") + ")",
               (exports / "student" / "export_report.json").is_file(),
               lambda: _export(out / "student", exports / "student", data, full=True, coreml=coreml_note is None,
                               progress=progress, seed=config.seed), exports / "student")

    def time_image_towers() -> None:
        for name in ROLES:
            if not (exports / name / "export_report.json").is_file():
                _export(out / name, exports / name, data, full=False, coreml=False, progress=progress,
                        seed=config.seed)
            result = bench_export(exports / name, BenchConfig(runs=config.bench_runs, warmup=max(3, config.bench_runs
                                                                                               // 5),
                                                              threads=(1,), torch_eager=False, coreml=False,
                                                              progress=progress))
            write_json_atomic(exports / name / "bench.json", result)

    stages.run("time every image tower (onnxruntime, 1 thread, batch 1)",
               all((exports / n / "bench.json").is_file() for n in ROLES), time_image_towers, exports)

    summary = _summary(out, data, splits, coreml_note, config, time.time() - start, stages.times)
    stages.run("summary.json and report.html", False, lambda: _write_outputs(out, summary), out)
    return summary


def _coreml_note(wanted: bool) -> str | None:
    """None when CoreML packages will be written; else why not (the table says so)."""
    if not wanted:
        return "CoreML not requested (--no-coreml)"

    return coreml_unavailable_reason()


def _export(model_dir: Path, target: Path, data: Path, full: bool, coreml: bool, progress: bool, seed: int) -> None:
    """The student in every format (`full`), or one model's image tower in fp32 ONNX for timing."""
    if full:
        config = ExportConfig(formats=("onnx", "coreml") if coreml else ("onnx",), quantize="int8", data=str(data),
                              progress=progress, seed=seed, extra={"command": "mobiledistill quickstart"})
    else:
        config = ExportConfig(formats=("onnx",), towers=("image",), data=str(data), num_parity_samples=4,
                              progress=progress, seed=seed, extra={"command": "mobiledistill quickstart"})
    export_model(f"local-dir:{model_dir}", target, config)


def _image_latency(bench_path: Path) -> float | None:
    if not bench_path.is_file():
        return None
    row = latency_row(read_json_file(bench_path)["results"], "image")
    return row["median_ms"] if row else None


def _summary(out: Path, data: Path, splits: list[str], coreml_note: str | None, config: QuickstartConfig,
             wall_s: float, stage_times: dict[str, float]) -> dict[str, Any]:
    rows = []
    for name, role in ROLES.items():
        evaluation = read_json_file(out / "eval" / f"{name}.test.json")
        counts = parameter_counts(out / name)
        row = {"name": name, "role": role, "model_dir": str(out / name), "params": counts["params"],
               "image_params": counts["image_params"], "text_params": counts["text_params"],
               "top1": evaluation["zeroshot"]["top1"],
               "retrieval_R@1": evaluation["retrieval"]["image_to_text"]["R@1"],
               "text_to_image_R@1": evaluation["retrieval"]["text_to_image"]["R@1"],
               "image_latency_ms": _image_latency(out / "export" / name / "bench.json")}
        for split in splits[1:]:
            other = read_json_file(out / "eval" / f"{name}.{split}.json")
            row[f"{split}_top1"] = other["zeroshot"]["top1"]
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    student, baseline, teacher = by_name["student"], by_name["baseline"], by_name["teacher-m"]
    for r in rows:
        r["speedup_vs_teacher_m"] = (teacher["image_latency_ms"] / r["image_latency_ms"]
                                     if r["image_latency_ms"] and teacher["image_latency_ms"] else None)
    report = read_json_file(out / "export" / "student" / "export_report.json")
    checks = {
        "student_minus_baseline_points": 100 * (student["top1"] - baseline["top1"]),
        "student_over_teacher_m_top1": student["top1"] / teacher["top1"] if teacher["top1"] else None,
        "student_image_speedup_vs_teacher_m": student["speedup_vs_teacher_m"],
    }
    return {"data_dir": str(data), "rows": rows, "wall_s": round(wall_s, 1), "split": "test",
            "checks": checks, "targets": {"student_minus_baseline_points": 3.0, "student_over_teacher_m_top1": 0.85,
                                          "student_image_speedup_vs_teacher_m": 4.0},
            "export": {"dir": str(out / "export" / "student"),
                       "files": sorted(n for n, e in report["files"].items() if e.get("kept", True)),
                       "int8_zeroshot_change_points": (report.get("zeroshot") or {}).get("top1_change_points"),
                       "coreml": coreml_note or report.get("coreml_note") or "converted"},
            "stage_wall_s": stage_times, "config": asdict(config)}


def format_summary(summary: dict[str, Any]) -> str:
    """The final table: params, zero-shot top-1, retrieval R@1, image-tower latency, speed-up over teacher-m."""
    noto = any("test_noto_top1" in r for r in summary["rows"])
    head = f"{'model':<10} {'role':<8} {'params (M)':>10} {'image (M)':>9} {'top-1':>6} " + \
        (f"{'noto':>6} " if noto else "") + f"{'R@1':>6} {'image ms':>8} {'speed-up':>8}"
    lines = [head, "-" * len(head)]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    for r in summary["rows"]:
        ms = "-" if r["image_latency_ms"] is None else f"{r['image_latency_ms']:.2f}"
        speed = "-" if r["speedup_vs_teacher_m"] is None else f"{r['speedup_vs_teacher_m']:.1f}x"
        lines.append(f"{r['name']:<10} {r['role']:<8} {r['params'] / 1e6:>10.2f} {r['image_params'] / 1e6:>9.2f} "
                     f"{pct(r['top1']):>6} " + (f"{pct(r.get('test_noto_top1')):>6} " if noto else "") +
                     f"{pct(r['retrieval_R@1']):>6} {ms:>8} {speed:>8}")
    c, t = summary["checks"], summary["targets"]

    def verdict(key, fmt):
        value = c[key]
        if value is None:
            return "n/a"
        return f"{fmt.format(value)} ({'meets' if value >= t[key] else 'MISSES'} the target {fmt.format(t[key])})"

    lines += [""]
    if summary["config"].get("limit") is not None:
        lines.append(f"toy sizes (a {summary['config']['limit']}-emoji subset): the targets apply to the full run")
    lines += [f"student - baseline: {verdict('student_minus_baseline_points', '{:+.1f} points')}",
              f"student / teacher-m top-1: {verdict('student_over_teacher_m_top1', '{:.0%}')}",
              f"student image tower vs teacher-m's: {verdict('student_image_speedup_vs_teacher_m', '{:.1f}x')} "
              "faster",
              f"exported: {', '.join(summary['export']['files'])} in {summary['export']['dir']}; CoreML: "
              f"{summary['export']['coreml']}",
              f"wall time {summary['wall_s'] / 60:.1f} min (zero-shot top-1 and R@1 in %, test split; latency: "
              "onnxruntime fp32, 1 thread, batch 1)"]
    return "\n".join(lines)


def _write_outputs(out: Path, summary: dict[str, Any]) -> None:
    rows = [{**r, "path": r["model_dir"], "text_latency_ms": None,
             "latency_source": "onnxruntime fp32, 1 thread (quickstart)"} for r in summary["rows"]]
    intro = (f"<p>The quickstart on <code>{html.escape(summary['data_dir'])}</code>, "
             f"{summary['wall_s'] / 60:.1f} minutes.</p><pre>{html.escape(format_summary(summary))}</pre>")
    write_text_atomic(out / "report.html", render_report(rows, "mobiledistill quickstart", intro))
    write_json_atomic(out / "summary.json", summary)
