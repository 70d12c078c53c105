"""`mobiledistill export`: a model spec in, an export directory out, every file checked against eager PyTorch.

    image_encoder.onnx, text_encoder.onnx            fp32, dynamic batch; max abs diff <= 1e-4, min cosine >= 0.9999
    image_encoder.int8.onnx, text_encoder.int8.onnx  with --quantize int8; min cosine >= 0.99
    image_encoder.mlpackage, text_encoder.mlpackage  with --format coreml; ML Program, iOS17 by default
    preprocess.json, tokenizer.json, README.md
    export_report.json                               written last: per-file max_abs_diff and min_cosine

The directory is assembled under a temporary name beside `out` and renamed when everything passed, so a failed or
interrupted export leaves nothing that looks finished.
"""

import copy
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from export.parity import FP16_BOUND, FP32_BOUND, INT8_BOUND, ParityBound, check_parity, compare_embeddings
from export.towers import (
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    TEXT_INPUT,
    TEXT_OUTPUT,
    ImageEncoder,
    TextEncoder,
    prepare_for_export,
)
from mdcore.atomic import atomic_directory, write_json_atomic
from mdcore.errors import UserInputError
from mdcore.paths import check_output
from teachers.specs import LoadedModel

__all__ = ["ExportConfig", "export_model", "export_loaded_model", "FORMATS", "REPORT_NAME"]

FORMATS = ("onnx", "coreml")
TOWERS = ("image", "text")
REPORT_NAME = "export_report.json"


@dataclass
class ExportConfig:
    formats: tuple[str, ...] = FORMATS
    towers: tuple[str, ...] = TOWERS  # e.g. ("image",) to time an image tower alone
    quantize: str | None = None  # None or "int8"
    data: str | None = None  # dataset root (or shards) for parity inputs, calibration and zero-shot accuracy
    split: str = "test"
    num_parity_samples: int = 16
    num_calibration_samples: int = 32
    coreml_target: str = "iOS17"
    coreml_compress: str | None = None  # None, "palettize" or "int8"
    coreml_text_fp16_min_cosine: float = FP16_BOUND.min_cosine
    fp32_max_abs_diff: float = FP32_BOUND.max_abs_diff
    fp32_min_cosine: float = FP32_BOUND.min_cosine
    int8_min_cosine: float = INT8_BOUND.min_cosine
    seed: int = 0
    overwrite: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the report (e.g. the command line)

    def __post_init__(self):
        self.formats, self.towers = tuple(self.formats), tuple(self.towers)
        if not self.towers or any(t not in TOWERS for t in self.towers):
            raise UserInputError(f"towers must be among {', '.join(TOWERS)}, got {', '.join(self.towers) or 'none'}")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise UserInputError(f"unknown export format {','.join(unknown) or '(none)'} (known: {','.join(FORMATS)})")
        if self.quantize not in (None, "int8"):
            raise UserInputError(f"unknown quantization {self.quantize!r} (known: int8)")
        if self.num_parity_samples < 2:
            raise UserInputError("parity needs at least 2 samples (batch 1 and a larger batch are both checked)")


def export_model(spec: str, out: str | Path, config: ExportConfig) -> dict[str, Any]:
    """Load `spec` (any model spec) and export it; returns the report written to `out/export_report.json`."""
    from teachers.specs import load_model

    out = Path(out)
    _check_out(out, config.overwrite)
    check_output(out, [spec, config.data])  # --overwrite must never delete the model or data it reads
    if config.data is not None and not Path(config.data).exists() and not any(c in config.data for c in "{*"):
        raise UserInputError(f"dataset not found: {config.data}")
    torch.manual_seed(config.seed)  # an architecture without weights gets the same random ones every export
    loaded = load_model(spec)
    return export_loaded_model(loaded, out, config)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserInputError(f"{out} already exists (pass --overwrite to replace it)")


def export_loaded_model(loaded: LoadedModel, out: str | Path, config: ExportConfig) -> dict[str, Any]:
    """Export an already loaded model (see `export_model`)."""
    out = Path(out)
    _check_out(out, config.overwrite)
    if "coreml" in config.formats:
        from export.coreml import coreml_unavailable_reason

        reason = coreml_unavailable_reason()
        if reason:
            raise UserInputError(f"{reason}; export with --format onnx")
    with atomic_directory(out) as tmp:
        report = _export_into(loaded, tmp, config)
    return report


def _export_into(loaded: LoadedModel, directory: Path, config: ExportConfig) -> dict[str, Any]:
    from export.files import export_readme, preprocess_json, tokenizer_json
    from export.inputs import load_inputs

    start = time.time()
    torch.manual_seed(config.seed)
    prepared = prepare_for_export(loaded.model)
    preprocess = preprocess_json(loaded)
    height, width = preprocess["size"]
    inputs = load_inputs(config.data, config.split, config.num_parity_samples, max(height, width), config.seed,
                         text_count=config.num_parity_samples)
    images = torch.stack([loaded.preprocess(im) for im in inputs.images])  # (N, 3, H, W)
    tokens = loaded.tokenizer(inputs.texts).to(torch.int32)  # (N, L)
    towers = {
        "image": _Tower("image", ImageEncoder(prepared.model).eval(), images, IMAGE_INPUT, IMAGE_OUTPUT),
        "text": _Tower("text", TextEncoder(prepared.model).eval(), tokens, TEXT_INPUT, TEXT_OUTPUT),
    }
    towers = {name: tower for name, tower in towers.items() if name in config.towers}
    for tower in towers.values():
        with torch.no_grad():
            tower.eager = tower.module(tower.inputs).numpy()  # (N, D): what every exported file is compared to

    keep_onnx = "onnx" in config.formats
    steps = len(towers) * (1 + bool(config.quantize) + ("coreml" in config.formats)) + 1
    bar = tqdm(total=steps, desc="export", disable=not config.progress, leave=False)
    files: dict[str, dict[str, Any]] = {}
    fp32_bound = ParityBound(config.fp32_max_abs_diff, config.fp32_min_cosine)
    for tower in towers.values():
        bar.set_postfix_str(f"{tower.name} tower -> ONNX")
        files[tower.onnx_name] = _export_onnx_tower(tower, directory, fp32_bound)
        bar.update()

    zeroshot = None
    if config.quantize:
        int8_bound = ParityBound(None, config.int8_min_cosine)
        calibration = _calibration_inputs(loaded, config, max(height, width))
        for tower in towers.values():
            bar.set_postfix_str(f"{tower.name} tower -> int8")
            files[tower.int8_name] = _quantize_tower(tower, directory, calibration[tower.name], int8_bound,
                                                     config.progress)
            bar.update()
        if config.data is not None and len(towers) == len(TOWERS):
            bar.set_postfix_str("zero-shot fp32 vs int8")
            zeroshot = _zero_shot_change(loaded, directory, towers, config)

    coreml_note = None
    if "coreml" in config.formats:
        from export.coreml import can_run_coreml

        for tower in towers.values():
            bar.set_postfix_str(f"{tower.name} tower -> CoreML")
            files[tower.coreml_name] = _convert_coreml_tower(tower, loaded, directory, config, preprocess, inputs)
            bar.update()
        if not can_run_coreml():
            coreml_note = (f"CoreML packages were converted and their specs validated on {platform.system()}, where "
                           "CoreML cannot run predictions: numeric parity was checked on ONNX only. Run `mobiledistill "
                           "export` on macOS to check the packages' own outputs.")

    if not keep_onnx:  # the ONNX graphs were only the parity reference of the CoreML packages
        for tower in towers.values():
            (directory / tower.onnx_name).unlink()
            files[tower.onnx_name]["kept"] = False

    bar.set_postfix_str("files")
    tokenizer = tokenizer_json(loaded)
    write_json_atomic(directory / "preprocess.json", preprocess)
    write_json_atomic(directory / "tokenizer.json", tokenizer)
    report = {
        "model": str(loaded.spec),
        "embed_dim": int(next(iter(towers.values())).eager.shape[1]),
        "towers": list(towers),
        "formats": list(config.formats),
        "quantize": config.quantize,
        "reparameterized_modules": len(prepared.reparameterized),
        "attention_layers_rewritten": prepared.attention_rewritten,
        "parity_inputs": {"source": inputs.source, "num_images": len(inputs.images), "num_texts": len(inputs.texts),
                          "batches_checked": [1, len(inputs.images)]},
        "bounds": {"fp32": {"max_abs_diff": fp32_bound.max_abs_diff, "min_cosine": fp32_bound.min_cosine},
                   "int8": {"min_cosine": config.int8_min_cosine},
                   "coreml_text_fp16": {"min_cosine": config.coreml_text_fp16_min_cosine}},
        "files": files,
        "zeroshot": zeroshot,
        "coreml_note": coreml_note,
        "config": {k: v for k, v in asdict(config).items() if k not in ("progress", "extra")},
        "platform": {"system": platform.system(), "machine": platform.machine(), "torch": torch.__version__},
        "wall_s": round(time.time() - start, 1),
        **config.extra,
    }
    (directory / "README.md").write_text(export_readme(report, preprocess, tokenizer))
    write_json_atomic(directory / REPORT_NAME, report)  # last: its presence marks a finished export
    bar.update()
    bar.close()
    return json.loads((directory / REPORT_NAME).read_text())  # what readers of the file see (lists, not tuples)


@dataclass
class _Tower:
    name: str  # "image" or "text"
    module: torch.nn.Module
    inputs: torch.Tensor  # (N, ...) parity inputs
    input_name: str
    output_name: str
    eager: np.ndarray | None = None

    @property
    def onnx_name(self) -> str:
        return f"{self.name}_encoder.onnx"

    @property
    def int8_name(self) -> str:
        return f"{self.name}_encoder.int8.onnx"

    @property
    def coreml_name(self) -> str:
        return f"{self.name}_encoder.mlpackage"


def _export_onnx_tower(tower: _Tower, directory: Path, bound) -> dict[str, Any]:
    from export.onnx_export import check_onnx, export_onnx, onnx_session, run_onnx

    path = directory / tower.onnx_name
    # Example batch of 2: torch.export specializes a batch of 1 into a constant.
    export_onnx(tower.module, tower.inputs[:2], path, tower.input_name, tower.output_name, tower.name)
    check_onnx(path)
    session = onnx_session(path)
    metrics = _onnx_metrics(session, tower, run_onnx)
    check_parity(tower.onnx_name, metrics, bound)
    return _file_entry(path, tower, "fp32", metrics, session)


def _onnx_metrics(session, tower: _Tower, run_onnx) -> dict[str, float]:
    """Parity at batch 1 (the first sample) and at the full batch: the dynamic axis must hold at both."""
    inputs = tower.inputs.numpy()
    single = compare_embeddings(tower.eager[:1], run_onnx(session, inputs[:1]))
    full = compare_embeddings(tower.eager, run_onnx(session, inputs, batch_size=len(inputs)))
    return {"max_abs_diff": max(single["max_abs_diff"], full["max_abs_diff"]),
            "min_cosine": min(single["min_cosine"], full["min_cosine"])}


def _file_entry(path: Path, tower: _Tower, precision: str, metrics: dict[str, float] | None, session=None,
                **more: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"tower": tower.name, "format": "onnx" if path.suffix == ".onnx" else "coreml",
                             "precision": precision,
                             "max_abs_diff": None if metrics is None else metrics["max_abs_diff"],
                             "min_cosine": None if metrics is None else metrics["min_cosine"],
                             "checked_by": "onnxruntime" if session is not None else "spec only",
                             "bytes": _size_of(path)}
    if session is not None:
        entry["inputs"] = [{"name": i.name, "shape": i.shape, "dtype": i.type} for i in session.get_inputs()]
        entry["outputs"] = [{"name": o.name, "shape": o.shape, "dtype": o.type} for o in session.get_outputs()]
    entry.update(more)
    return entry


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _calibration_inputs(loaded: LoadedModel, config: ExportConfig, size: int) -> dict[str, torch.Tensor]:
    """Calibration inputs per tower (images (N, 3, H, W), token ids (N, L)): the training split when the dataset
    has one. Static QDQ calibrates on the images; dynamic int8 reads either only to smooth activations."""
    from export.inputs import load_inputs

    split = "train" if config.data is not None and (Path(config.data) / "train").is_dir() else config.split
    inputs = load_inputs(config.data, split, config.num_calibration_samples, size, config.seed + 1,
                         text_count=config.num_calibration_samples)
    return {"image": torch.stack([loaded.preprocess(im) for im in inputs.images]),
            "text": loaded.tokenizer(inputs.texts).to(torch.int32)}


def _quantize_tower(tower: _Tower, directory: Path, calibration: torch.Tensor, bound, progress: bool
                    ) -> dict[str, Any]:
    from export.onnx_export import onnx_session, run_onnx
    from export.quantize import grouped_convs, quantization_method, quantize_within_bound

    fp32_path, int8_path = directory / tower.onnx_name, directory / tower.int8_name
    method = quantization_method(fp32_path, tower.name)
    batches = [x[None] for x in calibration.numpy()]  # (1, ...) each

    def min_cosine_of(path: Path) -> float:
        metrics = _onnx_metrics(onnx_session(path), tower, run_onnx)
        return metrics["min_cosine"] if np.isfinite(metrics["min_cosine"]) else float("-inf")

    outcome = quantize_within_bound(fp32_path, int8_path, method, min_cosine_of, bound.min_cosine, batches,
                                    tower.input_name, progress)
    session = onnx_session(int8_path)
    metrics = _onnx_metrics(session, tower, run_onnx)
    check_parity(tower.int8_name, metrics, bound)
    return _file_entry(int8_path, tower, "int8", metrics, session, method=method,
                       calibration_samples=len(calibration) if method == "static_qdq" or outcome["smoothing_alpha"]
                       else 0, per_channel=outcome["per_channel"], float32_nodes=outcome["excluded_nodes"],
                       smoothing_alpha=outcome["smoothing_alpha"], smoothed_activations=outcome["smoothed_activations"],
                       fused_attention=outcome["fused_attention"],
                       float32_grouped_convs=len(grouped_convs(fp32_path)) if method == "static_qdq" else 0)


def _zero_shot_change(loaded: LoadedModel, directory: Path, towers: dict, config: ExportConfig) -> dict[str, Any]:
    """Zero-shot top-1 of the fp32 and the int8 ONNX towers on the dataset split (CLIP_benchmark's protocol)."""
    from distill.evaluate import load_eval_data, zero_shot_metrics
    from export.onnx_export import onnx_session, run_onnx

    data = load_eval_data(config.data, config.split)
    prompts = [t.format(c=c) for c in data.classnames for t in data.templates]
    prompt_tokens = loaded.tokenizer(prompts).to(torch.int32).numpy()  # (C * T, L)
    precisions = (("fp32", ".onnx"), ("int8", ".int8.onnx"))
    classifiers, image_sessions = {}, {}
    for precision, suffix in precisions:
        text_emb = torch.from_numpy(run_onnx(onnx_session(directory / f"text_encoder{suffix}"), prompt_tokens))
        classifier = text_emb.view(len(data.classnames), len(data.templates), -1).mean(dim=1)  # (C, D)
        classifiers[precision] = torch.nn.functional.normalize(classifier, dim=-1)
        image_sessions[precision] = onnx_session(directory / f"image_encoder{suffix}")
    logits: dict[str, list[torch.Tensor]] = {precision: [] for precision, _ in precisions}
    labels = []
    for images, _, batch_labels in data.batches(64):
        keep = batch_labels >= 0
        if not keep.any():
            continue
        pixels = torch.stack([loaded.preprocess(im) for im, k in zip(images, keep) if k]).numpy()
        for precision, session in image_sessions.items():
            image_emb = torch.from_numpy(run_onnx(session, pixels))  # (B, D)
            logits[precision].append(image_emb @ classifiers[precision].T)
        labels.append(batch_labels[keep])
    if not labels:
        return None
    labels = torch.cat(labels)
    result = {"split": config.split, "num_samples": len(labels), "num_classes": len(data.classnames)}
    for precision, _ in precisions:
        result[f"{precision}_top1"] = zero_shot_metrics(torch.cat(logits[precision]), labels)["top1"]
    result["top1_change_points"] = 100 * (result["int8_top1"] - result["fp32_top1"])
    return result


def _convert_coreml_tower(tower: _Tower, loaded: LoadedModel, directory: Path, config: ExportConfig,
                          preprocess: dict[str, Any], inputs) -> dict[str, Any]:
    from export.coreml import can_run_coreml, convert_coreml, predict_coreml, validate_mlpackage

    path = directory / tower.coreml_name
    more: dict[str, Any] = {"deployment_target": config.coreml_target, "compression": config.coreml_compress}
    if tower.name == "image":
        precision = "fp16"  # image towers are convolution / attention stacks that FP16 keeps within 0.1%
        module = ImageEncoder(tower.module.model, preprocess["mean"], preprocess["std"]).eval()
        example = torch.rand(1, 3, *preprocess["size"])
    else:
        fp16 = _fp16_text_cosine(tower)
        precision = "fp16" if fp16 >= config.coreml_text_fp16_min_cosine else "fp32"
        more["fp16_eager_min_cosine"] = fp16
        more["precision_reason"] = (
            f"float16 eager text tower: min cosine {fp16:.6f} "
            f"{'>=' if precision == 'fp16' else '<'} {config.coreml_text_fp16_min_cosine:g} against float32, so "
            f"{precision.upper()} compute")
        module, example = tower.module, tower.inputs[:1]
    metadata = {"mobiledistill.model": str(loaded.spec), "mobiledistill.tower": tower.name,
                "mobiledistill.precision": precision}
    convert_coreml(module, example, path, tower=tower.name, input_name=tower.input_name,
                   output_name=tower.output_name, precision=precision, target=config.coreml_target,
                   compress=config.coreml_compress, metadata=metadata)
    spec = validate_mlpackage(path, tower=tower.name, input_name=tower.input_name, input_shape=list(example.shape),
                              output_name=tower.output_name, embed_dim=tower.eager.shape[1], precision=precision,
                              target=config.coreml_target)
    more["spec"] = {k: spec[k] for k in ("specification_version", "inputs", "outputs", "compute_precision")}
    metrics = None
    if can_run_coreml():
        if tower.name == "image":
            height, width = preprocess["size"]
            pictures = [_center_crop(im, height, width) for im in inputs.images]
            reference = module(torch.stack([_to_unit_tensor(p) for p in pictures])).detach().numpy()
            outputs = predict_coreml(path, pictures, tower.input_name, tower.output_name)
        else:
            reference = tower.eager
            outputs = predict_coreml(path, [t[None] for t in tower.inputs.numpy()], tower.input_name,
                                     tower.output_name)
        metrics = compare_embeddings(reference, outputs)
        bound = FP16_BOUND if precision == "fp16" or config.coreml_compress else FP32_BOUND
        check_parity(tower.coreml_name, metrics, ParityBound(None, bound.min_cosine))
    entry = _file_entry(path, tower, precision, metrics, None, **more)
    entry["checked_by"] = "coreml (CPU_ONLY)" if metrics is not None else "spec only (CoreML predictions need macOS)"
    return entry


def _fp16_text_cosine(tower: _Tower) -> float:
    """How close a float16 text tower stays to float32: the tower run in half precision on CPU, CoreML's FP16
    compute as closely as PyTorch can mimic it (half weights, half activations)."""
    module = copy.deepcopy(tower.module).half()
    with torch.no_grad():
        try:
            half = module(tower.inputs).float().numpy()
        except RuntimeError:  # an op without a CPU half kernel: keep the tower in FP32
            return float("-inf")
    cosine = compare_embeddings(tower.eager, half)["min_cosine"]
    return cosine if np.isfinite(cosine) else float("-inf")


def _center_crop(image, height: int, width: int):
    from PIL import Image

    scale = max(height / image.height, width / image.width)
    image = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _to_unit_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
