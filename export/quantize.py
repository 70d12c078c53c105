"""int8 ONNX towers with onnxruntime's quantization tools.

Transformer towers (every text tower, ViT image towers) get dynamic quantization: int8 weights, activations
quantized per batch at run time, which needs no calibration and suits MatMul-heavy graphs. Convolutional towers
(MobileCLIP's MCi / FastViT) get static QDQ quantization: int8 weights per channel and activation ranges
calibrated on real images, the format mobile runtimes (NNAPI, XNNPACK, CoreML's ONNX importers) accelerate.
"""

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from export.onnx_export import count_ops
from export.parity import ExportError

__all__ = ["quantization_method", "quantize_onnx", "CONV_TOWER_MIN_CONVS"]

# A ViT has exactly one Conv (its patch embedding); a convolutional stem alone has a few. More than this many
# Conv nodes means the tower is mostly convolutional.
CONV_TOWER_MIN_CONVS = 8


def quantization_method(onnx_path: str | Path, tower: str) -> str:
    """"static_qdq" for convolutional image towers, "dynamic" for transformer towers."""
    if tower == "text":
        return "dynamic"
    return "static_qdq" if count_ops(onnx_path).get("Conv", 0) >= CONV_TOWER_MIN_CONVS else "dynamic"


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, method: str,
                  calibration: Iterable[np.ndarray] | None = None, input_name: str = "image") -> Path:
    """Write the int8 version of `fp32_path`; `calibration` yields (1, ...) input arrays for static QDQ."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    try:
        if method == "dynamic":
            quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
        elif method == "static_qdq":
            if calibration is None:
                raise ValueError("static quantization needs calibration inputs")

            class _Reader(CalibrationDataReader):
                def __init__(self):
                    self.batches = iter(calibration)

                def get_next(self):
                    batch = next(self.batches, None)
                    return None if batch is None else {input_name: batch}

            with tempfile.TemporaryDirectory(dir=int8_path.parent) as work:
                # Shape inference and graph cleanup first, as onnxruntime recommends; symbolic shape inference
                # stops at the exporter's dynamic Expand nodes, onnx's own inference is enough here.
                prepared = Path(work) / "prepared.onnx"
                quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
                quantize_static(str(prepared), str(int8_path), _Reader(), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        else:
            raise ValueError(f"unknown quantization method {method!r}")
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        int8_path.unlink(missing_ok=True)
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot quantize {fp32_path.name} ({method}): {text}") from e
    return int8_path
