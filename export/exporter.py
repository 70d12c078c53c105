"""`mobiledistill export`: a model spec in, an export directory out, every file checked against eager PyTorch.

    image_encoder.onnx, text_encoder.onnx            fp32, dynamic batch; max abs diff <= 1e-4, min cosine >= 0.9999
    image_encoder.int8.onnx, text_encoder.int8.onnx  with --quantize int8; min cosine >= 0.99
    image_encoder.mlpackage, text_encoder.mlpackage  with --format coreml; ML Program, iOS17 by default
    image_encoder.pte, text_encoder.pte              with --format executorch; XNNPACK-delegated, batch 1
    image_encoder.tflite, text_encoder.tflite        with --format litert; XNNPACK by default, batch 1
    *.int8.pte, *.int8.tflite                        with --quantize int8 as well; min cosine >= 0.99
    preprocess.json, tokenizer.json, README.md
    export_report.json                               written last: per-file max_abs_diff and min_cosine

Every file is run in its own runtime (onnxruntime, ExecuTorch, LiteRT) against the eager tower before it counts,
and the parity inputs must first give the eager tower different outputs, or parity would prove nothing (random-weight
convolutional towers, whose layer scales start at 1e-5, embed every image alike: the report says so). With `--data`
every pair of files is also scored zero-shot beside eager, and a file more than `zeroshot_max_drop` points below
eager fails the export. The directory is assembled under a temporary name beside `out` and renamed when everything
passed, so a failed or interrupted export leaves nothing that looks finished.
"""

import copy
import json
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from tqdm import tqdm

from distill.evaluate import load_eval_data, zero_shot_metrics
from export.coreml import can_run_coreml, convert_coreml, coreml_unavailable_reason, predict_coreml, validate_mlpackage
from export.files import export_readme, preprocess_json, tokenizer_json
from export.inputs import load_inputs
from export.onnx_export import check_onnx, export_onnx, onnx_session, run_onnx
from export.parity import (
    FP16_BOUND,
    FP32_BOUND,
    INT8_BOUND,
    ExportError,
    ParityBound,
    check_parity,
    compare_embeddings,
    outputs_vary,
)
from export.phones import (
    executorch_float,
    executorch_int8,
    for_xnnpack,
    litert_float,
    run_reference,
    to_executorch,
    to_litert,
)
from export.quantize import grouped_convs, quantization_method, quantize_within_bound
from export.runtimes import (
    PHONE_FORMATS,
    RUNTIME_OF_FORMAT,
    SUFFIX_OF_FORMAT,
    format_of,
    open_runner,
    unavailable_reason,
)
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
from mdmodels.specs import LoadedModel, load_model

__all__ = ["ExportConfig", "export_model", "export_loaded_model", "FORMATS", "REPORT_NAME"]

FORMATS = ("onnx", "coreml", *PHONE_FORMATS)
TOWERS = ("image", "text")
# How far below the int8 bound a PT2E reference model may come and still be lowered and checked in ExecuTorch (its
# min cosine and the lowered program's differ by the kernels' rounding, by at most 0.0008 where measured: BENCHMARKS)
REFERENCE_MARGIN = 0.002
IMAGE_INPUTS = ("float", "uint8")  # normalized float NCHW, or camera pixels uint8 NHWC normalized in the graph
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
    image_input: str = "float"  # or "uint8"
    zeroshot_max_drop: float = 2.0  # points of top-1 a file may lose against eager on --data
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
        if self.image_input not in IMAGE_INPUTS:
            raise UserInputError(f"unknown image input {self.image_input!r} (known: {', '.join(IMAGE_INPUTS)})")
        if self.quantize not in (None, "int8"):
            raise UserInputError(f"unknown quantization {self.quantize!r} (known: int8)")
        if self.num_parity_samples < 2:
            raise UserInputError("parity needs at least 2 samples (batch 1 and a larger batch are both checked)")


def export_model(spec: str, out: str | Path, config: ExportConfig) -> dict[str, Any]:
    """Load `spec` (any model spec) and export it; returns the report written to `out/export_report.json`."""
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
        reason = coreml_unavailable_reason()
        if reason:
            raise UserInputError(f"{reason}; export with --format onnx")
    for fmt in PHONE_FORMATS:
        reason = unavailable_reason(fmt) if fmt in config.formats else None
        if reason:
            raise UserInputError(reason)
    with atomic_directory(out) as tmp:
        report = _export_into(loaded, tmp, config)
    return report


def _export_into(loaded: LoadedModel, directory: Path, config: ExportConfig) -> dict[str, Any]:
    start = time.time()
    torch.manual_seed(config.seed)
    prepared = prepare_for_export(loaded.model)
    pixels = config.image_input == "uint8"
    preprocess = preprocess_json(loaded, config.image_input)
    height, width = preprocess["size"]
    inputs = load_inputs(config.data, config.split, config.num_parity_samples, max(height, width), config.seed,
                         text_count=config.num_parity_samples)
    image_module = (ImageEncoder(prepared.model, preprocess["mean"], preprocess["std"], pixels=True) if pixels
                    else ImageEncoder(prepared.model))
    towers = {
        "image": _Tower("image", image_module.eval(), image_inputs(loaded, inputs.images, pixels), IMAGE_INPUT,
                        IMAGE_OUTPUT),
        "text": _Tower("text", TextEncoder(prepared.model).eval(), loaded.tokenizer(inputs.texts).to(torch.int32),
                       TEXT_INPUT, TEXT_OUTPUT),
    }
    towers = {name: tower for name, tower in towers.items() if name in config.towers}
    variation = {}
    for tower in towers.values():
        with torch.no_grad():
            tower.eager = tower.module(tower.inputs).numpy()  # (N, D): what every exported file is compared to
        variation[tower.name] = outputs_vary(tower.eager)
    for name, check in variation.items():
        if not check["varies"]:
            warnings.warn(f"the eager {name} tower gives nearly the same output for every parity input (mean pairwise "
                          f"cosine {check['mean_pairwise_cosine']:.4f}): its parity numbers prove little (random "
                          "weights? layer scales at their 1e-5 start?)", stacklevel=2)

    keep_onnx = "onnx" in config.formats
    phones = [f for f in config.formats if f in PHONE_FORMATS]
    precisions = 1 + bool(config.quantize)
    steps = len(towers) * (1 + (bool(config.quantize) and keep_onnx) + ("coreml" in config.formats)
                           + len(phones) * precisions) + 1 + (config.data is not None)
    bar = tqdm(total=steps, desc="export", disable=not config.progress, leave=False)
    files: dict[str, dict[str, Any]] = {}
    fp32_bound = ParityBound(config.fp32_max_abs_diff, config.fp32_min_cosine)
    int8_bound = ParityBound(None, config.int8_min_cosine)
    for tower in towers.values():  # ONNX first: the reference the other formats' choices are read from
        bar.set_postfix_str(f"{tower.name} tower -> ONNX")
        files[tower.file_name("onnx")] = _export_onnx_tower(tower, directory, fp32_bound)
        bar.update()

    calibration = None
    if config.quantize:
        calibration = _calibration_inputs(loaded, config, max(height, width))
    if config.quantize and keep_onnx:
        for tower in towers.values():
            bar.set_postfix_str(f"{tower.name} tower -> int8")
            files[tower.int8_name] = _quantize_tower(tower, directory, calibration[tower.name], int8_bound,
                                                     config.progress)
            bar.update()

    for fmt in phones:
        for tower in towers.values():
            bar.set_postfix_str(f"{tower.name} tower -> {fmt}")
            files[tower.file_name(fmt)] = _phone_file(tower, fmt, directory, fp32_bound)
            bar.update()
            if config.quantize:
                bar.set_postfix_str(f"{tower.name} tower -> {fmt} int8")
                files[tower.file_name(fmt, "int8")] = _phone_int8_file(tower, fmt, directory, calibration[tower.name],
                                                                      int8_bound)
                bar.update()

    coreml_note = None
    if "coreml" in config.formats:
        for tower in towers.values():
            bar.set_postfix_str(f"{tower.name} tower -> CoreML")
            files[tower.coreml_name] = _convert_coreml_tower(tower, loaded, directory, config, preprocess, inputs)
            bar.update()
        if not can_run_coreml():
            coreml_note = (f"CoreML packages were converted and their specs validated on {platform.system()}, where "
                           "CoreML cannot run predictions: numeric parity was checked on ONNX only. Run `mobiledistill "
                           "export` on macOS to check the packages' own outputs.")

    zeroshot = None
    if config.data is not None and len(towers) == len(TOWERS):
        bar.set_postfix_str("zero-shot, every file")
        zeroshot = _zero_shot(loaded, directory, towers, files, config)
        bar.update()

    if not keep_onnx:  # the ONNX graphs were only the parity reference of the other formats
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
        "image_input": config.image_input,
        "reparameterized_modules": len(prepared.reparameterized),
        "attention_layers_rewritten": prepared.attention_rewritten,
        "parity_inputs": {"source": inputs.source, "num_images": len(inputs.images), "num_texts": len(inputs.texts),
                          "batches_checked": [1, len(inputs.images)], "eager_outputs_vary": variation},
        "bounds": {"fp32": {"max_abs_diff": fp32_bound.max_abs_diff, "min_cosine": fp32_bound.min_cosine},
                   "int8": {"min_cosine": config.int8_min_cosine},
                   "coreml_text_fp16": {"min_cosine": config.coreml_text_fp16_min_cosine},
                   "zeroshot_max_drop_points": config.zeroshot_max_drop},
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


def image_inputs(loaded: LoadedModel, images: list, pixels: bool) -> torch.Tensor:
    """What the exported image tower takes for `images` (PIL): normalized float (N, 3, H, W) through the model's
    own preprocessing, or, for a pixel input, the resized and center-cropped uint8 RGB (N, H, W, 3)."""
    if not pixels:
        return torch.stack([loaded.preprocess(im) for im in images])

    height, width = preprocess_json(loaded)["size"]
    return torch.stack([torch.from_numpy(np.array(_center_crop(im, height, width), dtype=np.uint8))
                        for im in images])


@dataclass
class _Tower:
    name: str  # "image" or "text"
    module: torch.nn.Module
    inputs: torch.Tensor  # (N, ...) parity inputs
    input_name: str
    output_name: str
    eager: np.ndarray | None = None
    phone_floats: dict[str, Any] = field(default_factory=dict)  # per format (`_phone_float`)

    def file_name(self, fmt: str, precision: str = "fp32") -> str:
        return f"{self.name}_encoder{'.int8' if precision == 'int8' else ''}{SUFFIX_OF_FORMAT[fmt]}"

    @property
    def onnx_name(self) -> str:
        return self.file_name("onnx")

    @property
    def int8_name(self) -> str:
        return self.file_name("onnx", "int8")

    @property
    def coreml_name(self) -> str:
        return self.file_name("coreml")


def _export_onnx_tower(tower: _Tower, directory: Path, bound) -> dict[str, Any]:
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
    entry: dict[str, Any] = {"tower": tower.name, "format": format_of(path), "precision": precision,
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
    split = "train" if config.data is not None and (Path(config.data) / "train").is_dir() else config.split
    inputs = load_inputs(config.data, split, config.num_calibration_samples, size, config.seed + 1,
                         text_count=config.num_calibration_samples)
    return {"image": image_inputs(loaded, inputs.images, config.image_input == "uint8"),
            "text": loaded.tokenizer(inputs.texts).to(torch.int32)}


def _quantize_tower(tower: _Tower, directory: Path, calibration: torch.Tensor, bound, progress: bool
                    ) -> dict[str, Any]:
    fp32_path, int8_path = directory / tower.onnx_name, directory / tower.int8_name
    method = quantization_method(fp32_path, tower.name)
    batches = [x[None] for x in calibration.numpy()]  # (1, ...) each

    def min_cosine_of(path: Path) -> float:
        metrics = _onnx_metrics(onnx_session(path), tower, run_onnx)
        return metrics["min_cosine"] if np.isfinite(metrics["min_cosine"]) else float("-inf")

    fallback_from = None
    try:
        outcome = quantize_within_bound(fp32_path, int8_path, method, min_cosine_of, bound.min_cosine, batches,
                                        tower.input_name, progress)
    except ExportError as e:
        if method != "static_qdq":
            raise
        # Static QDQ also quantizes the activations between the kept-float products (adds, activations), so a
        # convolutional tower it cannot hold within the bound gets dynamic int8 of its matrix products instead
        # (its convolutions float: onnxruntime's dynamic ConvInteger is both slow and coarse).
        fallback_from = {"method": method, "reason": str(e)}
        method = "dynamic"
        outcome = quantize_within_bound(fp32_path, int8_path, method, min_cosine_of, bound.min_cosine, batches,
                                        tower.input_name, progress, weight_products_only=True)
    session = onnx_session(int8_path)
    metrics = _onnx_metrics(session, tower, run_onnx)
    check_parity(tower.int8_name, metrics, bound)
    return _file_entry(int8_path, tower, "int8", metrics, session, method=method, fallback_from=fallback_from,
                       calibration_samples=len(calibration) if method == "static_qdq" or outcome["smoothing_alpha"]
                       else 0, per_channel=outcome["per_channel"], float32_nodes=outcome["excluded_nodes"],
                       smoothing_alpha=outcome["smoothing_alpha"], smoothed_activations=outcome["smoothed_activations"],
                       fused_attention=outcome["fused_attention"],
                       float32_grouped_convs=len(grouped_convs(fp32_path)) if method == "static_qdq" else 0)


def _phone_file(tower: _Tower, fmt: str, directory: Path, bound: ParityBound) -> dict[str, Any]:
    """The fp32 `.pte` / `.tflite` of a tower, checked in its own runtime at batch 1 on every parity input."""
    path = directory / tower.file_name(fmt)
    if fmt == "executorch":
        delegation = to_executorch(_phone_float(tower, fmt), tower.inputs[:1], path)
    else:
        delegation = to_litert(_phone_float(tower, fmt), path)
    metrics = compare_embeddings(tower.eager, open_runner(path)(tower.inputs.numpy()))
    check_parity(path.name, metrics, bound)
    return _phone_entry(path, tower, "fp32", metrics, delegation)


def _phone_float(tower: _Tower, fmt: str) -> Any:
    """The tower rewritten for `fmt`'s XNNPACK (export.phones.for_xnnpack) and converted once per format: the
    ExecuTorch program or LiteRT flatbuffer that the fp32 file and every int8 attempt start from. LiteRT's converter
    takes the end-of-text argmax on int32 ids only."""
    if fmt not in tower.phone_floats:
        module = tower.module
        if tower.name == "text" and fmt == "litert":
            module = TextEncoder(module.model, int32_ids=True)
        module = for_xnnpack(module, fmt, int(tower.eager.shape[1]))
        convert = executorch_float if fmt == "executorch" else litert_float
        tower.phone_floats[fmt] = convert(module, tower.inputs[:1], tower.file_name(fmt))
    return tower.phone_floats[fmt]


def _phone_int8_file(tower: _Tower, fmt: str, directory: Path, calibration: torch.Tensor, bound: ParityBound
                     ) -> dict[str, Any]:
    """The int8 file of a tower: static int8 first where the ONNX path found a convolutional tower (what XNNPACK's
    int8 convolutions pay off on), then dynamic int8, then dynamic int8 of the matrix products alone; the first
    method that meets the bound in the runtime stays. An ExecuTorch method is lowered only when its PT2E reference
    model, run in PyTorch, comes within `REFERENCE_MARGIN` of the bound: a lowering costs far more than the check."""
    path = directory / tower.file_name(fmt, "int8")
    convolutional = quantization_method(directory / tower.onnx_name, tower.name) == "static_qdq"
    methods = ["static", "dynamic", "dynamic_matmul"] if convolutional else ["dynamic", "dynamic_matmul"]
    batches = [x[None] for x in calibration]  # (1, ...) each
    float_model = _phone_float(tower, fmt)
    tried = []
    for method in methods:
        try:
            if fmt == "executorch":
                reference = executorch_int8(float_model, method, batches)
                in_pytorch = compare_embeddings(tower.eager, run_reference(reference, tower.inputs))["min_cosine"]
                if not (np.isfinite(in_pytorch) and in_pytorch >= bound.min_cosine - REFERENCE_MARGIN):
                    tried.append({"method": method, "min_cosine": in_pytorch, "checked_by": "PT2E reference model "
                                  "in PyTorch (not lowered)"})
                    continue
                delegation = to_executorch(reference, tower.inputs[:1], path)
            else:
                delegation = to_litert(float_model, path, method, batches)
            metrics = compare_embeddings(tower.eager, open_runner(path)(tower.inputs.numpy()))
        except ExportError as e:  # this method does not convert; the next may
            tried.append({"method": method, "error": str(e)})
            continue
        tried.append({"method": method, "min_cosine": metrics["min_cosine"]})
        if np.isfinite(metrics["min_cosine"]) and metrics["min_cosine"] >= bound.min_cosine:
            return _phone_entry(path, tower, "int8", metrics, delegation, method=method,
                                calibration_samples=len(batches) if method == "static" else 0, tried=tried)
    path.unlink(missing_ok=True)
    summary = ", ".join(f"{t['method']} failed" if "min_cosine" not in t else f"{t['method']} {t['min_cosine']:.4f}"
                        + (" in PyTorch" if "checked_by" in t else "") for t in tried)
    raise ExportError(f"{path.name} misses its parity bound with every int8 method ({summary}; bound min cosine "
                      f"{bound.min_cosine:g})")


def _phone_entry(path: Path, tower: _Tower, precision: str, metrics: dict[str, float], delegation: dict[str, Any],
                 **more: Any) -> dict[str, Any]:
    entry = _file_entry(path, tower, precision, metrics, None, **delegation, **more)
    entry["checked_by"] = RUNTIME_OF_FORMAT[entry["format"]] + " (XNNPACK)"
    entry["batch"] = 1
    if entry["format"] == "litert":  # what the flatbuffer itself declares
        interpreter = open_runner(path, threads=1).interpreter
        for key, rows in (("inputs", interpreter.get_input_details()), ("outputs", interpreter.get_output_details())):
            entry[key] = [{"name": r["name"], "shape": [int(v) for v in r["shape"]], "dtype": np.dtype(r["dtype"]).name,
                           **({"scale": float(r["quantization"][0]), "zero_point": int(r["quantization"][1])}
                              if r["quantization"][0] else {})} for r in rows]
    else:
        entry["inputs"] = [{"name": tower.input_name, "shape": [1, *tower.inputs.shape[1:]],
                            "dtype": str(tower.inputs.dtype).removeprefix("torch.")}]
        entry["outputs"] = [{"name": tower.output_name, "shape": [1, int(tower.eager.shape[1])], "dtype": "float32"}]
    return entry


class _RunText:
    """What `open_clip.build_zero_shot_classifier` calls (`encode_text`), for a text tower run by a function of
    int32 token ids: an exported file in its runtime, or the eager tower."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray]):
        self.run = run

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = torch.from_numpy(np.asarray(self.run(tokens.to(torch.int32).numpy()), dtype=np.float32))  # (N, D)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def _zero_shot(loaded: LoadedModel, directory: Path, towers: dict, files: dict[str, dict[str, Any]],
               config: ExportConfig) -> dict[str, Any] | None:
    """Zero-shot top-1 on the dataset split (CLIP_benchmark's protocol) of the eager towers and of every image /
    text file pair of one format and precision, each run in its own runtime; a pair more than
    `zeroshot_max_drop` points below eager fails the export."""
    data = load_eval_data(config.data, config.split)
    pairs = {}  # (format, precision) -> (image runner, text runner)
    for name, entry in files.items():
        if entry["tower"] == "image" and entry["format"] in config.formats and entry["format"] != "coreml":
            text_name = name.replace("image_encoder", "text_encoder")
            if text_name in files:
                pairs[(entry["format"], entry["precision"])] = (name, text_name)

    def classifier(run_text: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
        """open_clip's template-ensembled classifier (D, C), its text tower run by `run_text` (token ids -> D)."""
        return open_clip.build_zero_shot_classifier(
            _RunText(run_text), loaded.tokenizer, data.classnames,
            templates=[lambda c, t=t: t.format(c=c) for t in data.templates],  # CLIP_benchmark's `{c}` placeholders
            num_classes_per_batch=None)  # every prompt in one batch, as each runtime takes it

    with torch.no_grad():
        classifiers = {"eager": classifier(lambda ids: towers["text"].module(torch.from_numpy(ids)).numpy())}
    image_runners = {}
    for key, (image_name, text_name) in pairs.items():
        classifiers[key] = classifier(open_runner(directory / text_name))
        image_runners[key] = open_runner(directory / image_name)
    logits: dict[Any, list[torch.Tensor]] = {key: [] for key in classifiers}
    labels = []
    for batch in data.batches(64):
        keep = batch.labels >= 0
        if not keep.any():
            continue
        x = image_inputs(loaded, [im for im, k in zip(batch.images, keep) if k], config.image_input == "uint8")
        with torch.no_grad():
            logits["eager"].append(towers["image"].module(x) @ classifiers["eager"])
        for key, runner in image_runners.items():
            logits[key].append(torch.from_numpy(runner(x.numpy())) @ classifiers[key])
        labels.append(batch.labels[keep])
    if not labels:
        return None
    labels = torch.cat(labels)
    top1 = {key: zero_shot_metrics(torch.cat(rows), labels)["top1"] for key, rows in logits.items()}
    result: dict[str, Any] = {"split": config.split, "num_samples": len(labels), "num_classes": len(data.classnames),
                              "eager_top1": top1["eager"], "pairs": []}
    for (fmt, precision), (image_name, text_name) in pairs.items():
        change = 100 * (top1[(fmt, precision)] - top1["eager"])
        result["pairs"].append({"format": fmt, "precision": precision, "image_file": image_name,
                                "text_file": text_name, "top1": top1[(fmt, precision)],
                                "change_points_vs_eager": change})
        for name in (image_name, text_name):
            files[name]["zeroshot_top1"] = top1[(fmt, precision)]
    if ("onnx", "int8") in top1 and ("onnx", "fp32") in top1:  # the ONNX summary earlier reports carried
        result["fp32_top1"], result["int8_top1"] = top1[("onnx", "fp32")], top1[("onnx", "int8")]
        result["top1_change_points"] = 100 * (result["int8_top1"] - result["fp32_top1"])
    worst = min(result["pairs"], key=lambda p: p["change_points_vs_eager"], default=None)
    if worst is not None and worst["change_points_vs_eager"] < -config.zeroshot_max_drop:
        raise ExportError(f"{worst['image_file']} + {worst['text_file']}: zero-shot top-1 {100 * worst['top1']:.1f}% "
                          f"against eager's {100 * top1['eager']:.1f}%, a change of "
                          f"{worst['change_points_vs_eager']:+.1f} points, below the {-config.zeroshot_max_drop:+g} "
                          "allowed")
    return result


def _convert_coreml_tower(tower: _Tower, loaded: LoadedModel, directory: Path, config: ExportConfig,
                          preprocess: dict[str, Any], inputs) -> dict[str, Any]:
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
    scale = max(height / image.height, width / image.width)
    image = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _to_unit_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
