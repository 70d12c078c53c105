"""CoreML export: ML Program packages (`.mlpackage`) converted from `torch.export` programs by coremltools.

The image encoder takes an RGB image input (CVPixelBuffer / CGImage in an app) at the model's size, scaled to
[0, 1] by CoreML; the CLIP mean/std normalization is part of the graph. The text encoder takes int32 token ids
(1, context_length). Both return a float32 L2-normalized embedding (1, D).

coremltools converts on any OS but runs predictions only on macOS. Elsewhere the saved package's spec is read back
and checked (names, shapes, dtypes, precision, deployment target); numeric parity is then checked on ONNX only.
"""

import contextlib
import io
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch._decomp import get_decompositions

from export.parity import ExportError

__all__ = ["coreml_unavailable_reason", "can_run_coreml", "convert_coreml", "describe_mlpackage",
           "validate_mlpackage", "predict_coreml", "COMPRESSIONS", "COREML_TARGETS"]

COMPRESSIONS = ("palettize", "int8")
COREML_TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
# ML Program specification version each deployment target writes.
_SPEC_VERSION = {"iOS16": 7, "macOS13": 7, "iOS17": 8, "macOS14": 8, "iOS18": 9, "macOS15": 9}


def _coremltools():
    logging.getLogger("coremltools").setLevel(logging.ERROR)  # import-time notes about untested torch versions
    import coremltools

    return coremltools


def _coreml_decompositions() -> dict:
    """The few ATen ops coremltools' torch.export frontend lacks, rewritten into ones it has. Hugging Face text
    towers (e.g. all-MiniLM-L6-v2) build their attention masks with `new_ones` and a boolean `&`."""
    aten = torch.ops.aten
    table = get_decompositions([aten.new_ones, aten.new_zeros, aten.new_full, aten.new_empty])
    table[aten.__and__.Tensor] = _and
    return table


def _and(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.logical_and(a, b) if a.dtype == torch.bool and b.dtype == torch.bool else torch.bitwise_and(a, b)


def coreml_unavailable_reason() -> str | None:
    """None when coremltools imports and can convert; else why not."""
    try:
        _coremltools()
    except Exception as e:  # a broken native extension raises more than ImportError
        return f"coremltools cannot be imported ({type(e).__name__}: {e})"
    return None


def can_run_coreml() -> bool:
    """CoreML predictions need macOS (the CoreML framework); conversion works everywhere."""
    return sys.platform == "darwin"


def convert_coreml(module: torch.nn.Module, example: torch.Tensor, path: str | Path, *, tower: str,
                   input_name: str, output_name: str, precision: str, target: str = "iOS17",
                   compress: str | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Convert one tower to an `.mlpackage` at `path`. `precision` is "fp16" or "fp32" compute precision."""
    ct = _coremltools()
    if target not in COREML_TARGETS:
        raise ExportError(f"unknown CoreML deployment target {target!r} (known: {', '.join(COREML_TARGETS)})")
    if tower == "image":
        inputs = [ct.ImageType(name=input_name, shape=tuple(example.shape), scale=1 / 255.0, bias=[0.0, 0.0, 0.0],
                               color_layout=ct.colorlayout.RGB)]
    else:
        inputs = [ct.TensorType(name=input_name, shape=tuple(example.shape), dtype=np.int32)]
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (example,)).run_decompositions(_coreml_decompositions())
            mlmodel = ct.convert(program, inputs=inputs, outputs=[ct.TensorType(name=output_name, dtype=np.float32)],
                                 convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target),
                                 compute_precision=ct.precision.FLOAT16 if precision == "fp16"
                                 else ct.precision.FLOAT32)
            if compress:
                mlmodel = _compress(ct, mlmodel, compress)
    except ExportError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"cannot convert the {tower} tower to CoreML: {first}") from e
    mlmodel.short_description = f"mobiledistill {tower} encoder: L2-normalized {output_name}"
    for key, value in (metadata or {}).items():
        mlmodel.user_defined_metadata[key] = str(value)
    mlmodel.save(str(path))
    return Path(path)


def _compress(ct, mlmodel, compress: str):
    """Weight compression: 6-bit k-means palettization or int8 linear quantization (coremltools.optimize)."""
    from coremltools.optimize import coreml as cto

    if compress == "palettize":
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=6))
        return cto.palettize_weights(mlmodel, config)
    if compress == "int8":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric"))
        return cto.linear_quantize_weights(mlmodel, config)
    raise ExportError(f"unknown CoreML compression {compress!r} (known: {', '.join(COMPRESSIONS)})")


def describe_mlpackage(path: str | Path) -> dict[str, Any]:
    """What the saved package's spec declares: inputs, outputs, spec version and the compute dtypes of its ops."""
    ct = _coremltools()
    from coremltools.proto import MIL_pb2

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()

    def feature(desc) -> dict[str, Any]:
        kind = desc.type.WhichOneof("Type")
        if kind == "imageType":
            image = desc.type.imageType
            color = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(image.colorSpace)
            return {"name": desc.name, "type": "image", "shape": [1, 3, int(image.height), int(image.width)],
                    "dtype": color}
        array = desc.type.multiArrayType
        dtype = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
        return {"name": desc.name, "type": "multiarray", "shape": [int(s) for s in array.shape], "dtype": dtype}

    op_dtypes: dict[str, int] = {}
    main = spec.mlProgram.functions["main"]
    for op in main.block_specializations[main.opset].operations:
        for output in op.outputs:
            if output.type.WhichOneof("type") == "tensorType":
                name = MIL_pb2.DataType.Name(output.type.tensorType.dataType)
                op_dtypes[name] = op_dtypes.get(name, 0) + 1
    return {"specification_version": int(spec.specificationVersion), "model_type": spec.WhichOneof("Type"),
            "inputs": [feature(d) for d in spec.description.input],
            "outputs": [feature(d) for d in spec.description.output],
            "compute_precision": "fp16" if op_dtypes.get("FLOAT16", 0) else "fp32", "op_output_dtypes": op_dtypes,
            "metadata": dict(spec.description.metadata.userDefined)}


def validate_mlpackage(path: str | Path, *, tower: str, input_name: str, input_shape: list[int],
                       output_name: str, embed_dim: int, precision: str, target: str) -> dict[str, Any]:
    """Read the package back and check it declares what an app will rely on; raise `ExportError` otherwise."""
    spec = describe_mlpackage(path)
    name = Path(path).name
    problems = []
    if spec["model_type"] != "mlProgram":
        problems.append(f"model type {spec['model_type']} is not an ML Program")
    if spec["specification_version"] < _SPEC_VERSION[target]:
        problems.append(f"specification version {spec['specification_version']} is older than {target}'s "
                        f"{_SPEC_VERSION[target]}")
    expected_input = {"name": input_name, "shape": list(input_shape),
                      "type": "image" if tower == "image" else "multiarray",
                      "dtype": "RGB" if tower == "image" else "INT32"}
    if len(spec["inputs"]) != 1 or {k: spec["inputs"][0][k] for k in expected_input} != expected_input:
        problems.append(f"inputs {spec['inputs']} != [{expected_input}]")
    expected_output = {"name": output_name, "type": "multiarray", "shape": [1, embed_dim], "dtype": "FLOAT32"}
    if len(spec["outputs"]) != 1 or spec["outputs"][0] != expected_output:
        problems.append(f"outputs {spec['outputs']} != [{expected_output}]")
    if spec["compute_precision"] != precision:
        problems.append(f"compute precision {spec['compute_precision']} != {precision}")
    if problems:
        raise ExportError(f"{name} spec check failed: {'; '.join(problems)}")
    return spec


def predict_coreml(path: str | Path, inputs: list, input_name: str, output_name: str,
                   compute_units: str = "CPU_ONLY") -> np.ndarray:
    """Run the package one input at a time (macOS only); images as PIL images, tokens as (1, L) int32 arrays."""
    ct = _coremltools()
    model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
    return np.concatenate([np.asarray(model.predict({input_name: x})[output_name]).reshape(1, -1) for x in inputs])
