"""int8 ONNX towers with onnxruntime's quantization tools.

Transformer towers (every text tower, ViT image towers) get dynamic quantization: int8 weights, activations
quantized per batch at run time, which suits MatMul-heavy graphs; their self-attention is first fused into
onnxruntime's `Attention` op, which quantizes to one `QAttention` kernel. They read calibration inputs only when
plain int8 misses the bound: their activation ranges drive SmoothQuant's rescaling (`export.smoothing`).
Convolutional towers (MobileCLIP's MCi / FastViT) get static QDQ quantization: int8 weights per channel and
activation ranges calibrated on real images, the format mobile runtimes (NNAPI, XNNPACK, CoreML's ONNX importers)
accelerate.

Static QDQ leaves grouped (depthwise) convolutions in float: onnxruntime's int8 kernels for them run several
times slower than its float ones on an AVX-512 CPU (measured in docs/BENCHMARKS.md, "Export"), and they hold a
tiny share of the weights. The node that feeds each of them (in MobileCLIP, a residual add) stays
float too: a quantized output puts a DequantizeLinear in front of the convolution, and onnxruntime's own
WeightBiasQuantization pass then quantizes that convolution's float weight itself and runs the slow kernel anyway.
"""

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from export.fusion import fuse_attention_file
from export.onnx_export import count_ops
from export.parity import FP32_BOUND, ExportError
from export.smoothing import SMOOTHING_ALPHAS, activation_ranges, smooth_activations

__all__ = ["quantization_method", "quantize_onnx", "quantize_within_bound", "weight_nodes", "grouped_convs",
           "float_in_static", "CONV_TOWER_MIN_CONVS", "WEIGHT_PRODUCTS"]

# A ViT has exactly one Conv (its patch embedding); a convolutional stem alone has a few. More than this many
# Conv nodes means the tower is mostly convolutional.
CONV_TOWER_MIN_CONVS = 8

# The matrix products dynamic int8 of "weights only" quantizes (each with a constant weight operand)
WEIGHT_PRODUCTS = ("MatMul", "Gemm", "Attention")


def quantization_method(onnx_path: str | Path, tower: str) -> str:
    """"static_qdq" for convolutional image towers, "dynamic" for transformer towers."""
    if tower == "text":
        return "dynamic"
    return "static_qdq" if count_ops(onnx_path).get("Conv", 0) >= CONV_TOWER_MIN_CONVS else "dynamic"


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, method: str,
                  calibration: Iterable[np.ndarray] | None = None, input_name: str = "image", per_channel: bool = False,
                  nodes_to_quantize: list[str] | None = None, nodes_to_exclude: list[str] | None = None,
                  cache_dir: str | Path | None = None, weight_products_only: bool = False) -> Path:
    """Write the int8 version of `fp32_path`; `calibration` yields (1, ...) input arrays for static QDQ (which is
    always per channel, and always keeps `float_in_static` nodes float; dynamic quantization does not read it).
    `nodes_to_quantize` / `nodes_to_exclude` restrict which nodes become int8. With `cache_dir`, static QDQ keeps
    the pre-processed graph and the calibrated activation ranges there, so that later calls on the same file with
    other node selections (the sensitivity search) neither pre-process nor calibrate again. `weight_products_only`
    limits dynamic quantization to matrix products with a constant weight (`WEIGHT_PRODUCTS`, each node's weight
    constant); by default onnxruntime chooses, convolutions and attention's activation-by-activation products
    included."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    selection = {"nodes_to_quantize": nodes_to_quantize, "nodes_to_exclude": nodes_to_exclude}
    try:
        if method == "dynamic":
            op_types = list(WEIGHT_PRODUCTS) if weight_products_only else None
            if weight_products_only and nodes_to_quantize is None:  # not attention's activation products
                selection["nodes_to_quantize"] = weight_nodes(fp32_path, method)
            quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=per_channel,
                             op_types_to_quantize=op_types, **selection)
        elif method == "static_qdq":
            if calibration is None:
                raise ValueError("static quantization needs calibration inputs")
            batches = list(calibration)

            class _Reader(CalibrationDataReader):
                def __init__(self):
                    self.batches = iter(batches)

                def get_next(self):
                    batch = next(self.batches, None)
                    return None if batch is None else {input_name: batch}

            with tempfile.TemporaryDirectory(dir=int8_path.parent) as work:
                store = Path(cache_dir) if cache_dir is not None else Path(work)
                prepared = store / f"{fp32_path.stem}.prepared.onnx"
                if not prepared.is_file():
                    # Shape inference and graph cleanup first, as onnxruntime recommends; symbolic shape inference
                    # stops at the exporter's dynamic Expand nodes, onnx's own inference is enough here.
                    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
                selection["nodes_to_exclude"] = list(nodes_to_exclude or []) + float_in_static(prepared)
                quantize_static(str(prepared), str(int8_path), _Reader(), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibration_cache_path=str(store / f"{fp32_path.stem}.ranges.json"), **selection)
            _grouped_convs_read_float(int8_path)
        else:
            raise ValueError(f"unknown quantization method {method!r}")
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        int8_path.unlink(missing_ok=True)
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot quantize {fp32_path.name} ({method}): {text}") from e
    return int8_path


def weight_nodes(onnx_path: str | Path, method: str) -> list[str]:
    """Names of the nodes quantization turns int8: matrix products, fused attention (its QKV weight) and, for
    static QDQ, convolutions with a constant weight; not what static QDQ always keeps float (`float_in_static`)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    op_types = set(WEIGHT_PRODUCTS) | ({"Conv"} if method == "static_qdq" else set())
    kept_float = set(float_in_static(onnx_path)) if method == "static_qdq" else set()
    return [n.name for n in graph.node
            if n.op_type in op_types and any(i in constants for i in n.input) and n.name not in kept_float]


def grouped_convs(onnx_path: str | Path) -> list[str]:
    """Names of the grouped (e.g. depthwise) Conv nodes, which static QDQ leaves in float."""
    import onnx

    return [n.name for n in _grouped(onnx.load(str(onnx_path), load_external_data=False).graph)]


def float_in_static(onnx_path: str | Path) -> list[str]:
    """What static QDQ keeps in float: the grouped convolutions and the nodes that produce their inputs."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {name: node for node in graph.node for name in node.output}
    grouped = _grouped(graph)
    feeders = [producer[n.input[0]].name for n in grouped if n.input[0] in producer]
    return list(dict.fromkeys([n.name for n in grouped] + feeders))


def _grouped_convs_read_float(int8_path: Path) -> None:
    """Point every grouped convolution that reads a quantize-dequantize pair at the float tensor before it.

    The quantizer shares one pair among a tensor's readers, so a float convolution can still read a dequantized
    tensor when another reader of the same tensor is int8; onnxruntime would then quantize the convolution. The
    other readers keep the pair; a pair left without readers is removed, with its scale and zero point."""
    import onnx

    model = onnx.load(str(int8_path))
    graph = model.graph
    producer = {name: node for node in graph.node for name in node.output}
    rewired = 0
    for conv in _grouped(graph):
        dequantize = producer.get(conv.input[0])
        quantize = producer.get(dequantize.input[0]) if dequantize is not None else None
        if dequantize is not None and dequantize.op_type == "DequantizeLinear" and quantize is not None \
                and quantize.op_type == "QuantizeLinear":
            conv.input[0] = quantize.input[0]
            rewired += 1
    if not rewired:
        return
    outputs = {o.name for o in graph.output}
    for op_type in ("DequantizeLinear", "QuantizeLinear"):  # readers first, so a bare pair goes in two passes
        read = {name for node in graph.node for name in node.input} | outputs
        for node in [n for n in graph.node if n.op_type == op_type and n.output[0] not in read]:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(tensor)  # the removed pairs' scales and zero points
    onnx.save(model, str(int8_path))


def _grouped(graph) -> list:
    return [n for n in graph.node
            if n.op_type == "Conv" and next((a.i for a in n.attribute if a.name == "group"), 1) > 1]


def quantize_within_bound(fp32_path: str | Path, int8_path: str | Path, method: str,
                          min_cosine_of: Callable[[Path], float], min_cosine: float,
                          calibration: Iterable[np.ndarray] | None = None, input_name: str = "image",
                          progress: bool = False, weight_products_only: bool = False) -> dict[str, Any]:
    """int8 with as many nodes quantized as the cosine bound allows.

    Dynamic quantization starts from a copy whose self-attention layers are fused into onnxruntime's `Attention`
    op (`export.fusion`; they become `QAttention`), kept only when that copy itself matches eager within the fp32
    cosine bound. Then everything is quantized, per tensor (fastest kernels), then per channel. When both miss the
    bound (a pretrained BERT-style text tower with outlier activations does) and `calibration` inputs are given,
    the activations are smoothed first (`export.smoothing`, each of `SMOOTHING_ALPHAS` in turn) and quantized per
    channel again. When that misses too, each weight node of the better of the plain and the smoothed graph is
    quantized alone to measure its sensitivity, and the most sensitive ones are kept in float32, 1, 2, 4, ... of
    them, until the bound holds: mixed precision instead of no int8 at all. Returns how it ended: `per_channel`,
    `excluded_nodes`, `min_cosine`, `smoothing_alpha` (None when not smoothed), `smoothed_activations`,
    `fused_attention`; raises `ExportError` when even that cannot meet the bound. `weight_products_only` limits
    dynamic quantization to the matrix products with a constant weight (`quantize_onnx`).
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    calibration = list(calibration) if calibration is not None else None
    with tempfile.TemporaryDirectory(dir=int8_path.parent) as work:
        work = Path(work)
        common = {"calibration": calibration, "input_name": input_name, "cache_dir": work,
                  "weight_products_only": weight_products_only}
        fused = _fused_copy(fp32_path, work / "fused.onnx", min_cosine_of) if method == "dynamic" else 0
        if fused:
            try:
                outcome = _quantize_to_bound(work / "fused.onnx", int8_path, method, min_cosine_of, min_cosine,
                                             common, work, progress)
                return {**outcome, "fused_attention": fused}
            except ExportError:
                pass  # quantizing the fused graph failed: the standard graph gets its own try
        outcome = _quantize_to_bound(fp32_path, int8_path, method, min_cosine_of, min_cosine, common, work, progress)
    return {**outcome, "fused_attention": 0}


def _fused_copy(fp32_path: Path, fused_path: Path, min_cosine_of: Callable[[Path], float]) -> int:
    """Write the attention-fused copy; its layer count, or 0 when nothing fused or the copy does not run or does
    not match eager within the fp32 cosine bound (the fusion is an optimization, never a reason to fail)."""
    fused = fuse_attention_file(fp32_path, fused_path)
    if not fused:
        return 0
    try:
        cosine = min_cosine_of(fused_path)
    except Exception:  # onnxruntime's load and run errors have no common base class but Exception
        return 0
    return fused if cosine >= FP32_BOUND.min_cosine else 0


def _quantize_to_bound(source: Path, int8_path: Path, method: str, min_cosine_of: Callable[[Path], float],
                       min_cosine: float, common: dict[str, Any], work: Path, progress: bool) -> dict[str, Any]:
    attempts = [False, True] if method == "dynamic" else [True]
    cosine = float("-inf")
    plain = {"smoothing_alpha": None, "smoothed_activations": 0}
    for per_channel in attempts:
        quantize_onnx(source, int8_path, method, per_channel=per_channel, **common)
        cosine = min_cosine_of(int8_path)
        if cosine >= min_cosine:
            return {"per_channel": per_channel, "excluded_nodes": [], "min_cosine": cosine, **plain}
    best = (cosine, source, plain)
    if method == "dynamic" and common["calibration"]:
        ranges = activation_ranges(source, np.concatenate(common["calibration"]), common["input_name"])
        for alpha in SMOOTHING_ALPHAS:
            smoothed_path = work / f"{source.stem}.smoothed{alpha}.onnx"
            count = smooth_activations(source, smoothed_path, ranges, alpha)
            if not count:
                break
            smoothing = {"smoothing_alpha": alpha, "smoothed_activations": count}
            quantize_onnx(smoothed_path, int8_path, method, per_channel=True, **common)
            cosine = min_cosine_of(int8_path)
            if cosine >= min_cosine:
                return {"per_channel": True, "excluded_nodes": [], "min_cosine": cosine, **smoothing}
            if cosine > best[0]:
                best = (cosine, smoothed_path, smoothing)
    _, source, smoothing = best
    nodes = weight_nodes(source, method)
    sensitivity = []
    probe = work / "probe.onnx"
    for name in tqdm(nodes, desc=f"int8 sensitivity of {int8_path.name}", disable=not progress, leave=False):
        quantize_onnx(source, probe, method, per_channel=True, nodes_to_quantize=[name], **common)
        sensitivity.append((min_cosine_of(probe), name))
    ranked = [name for _, name in sorted(sensitivity)]  # most sensitive first
    count, tried = 1, 0
    while count < len(ranked):
        excluded, tried = ranked[:count], count
        quantize_onnx(source, int8_path, method, per_channel=True, nodes_to_exclude=excluded, **common)
        cosine = min_cosine_of(int8_path)
        if cosine >= min_cosine:
            return {"per_channel": True, "excluded_nodes": excluded, "min_cosine": cosine, **smoothing}
        count *= 2
    int8_path.unlink(missing_ok=True)
    raise ExportError(f"{int8_path.name} misses its parity bound: min cosine {cosine:.6f} < {min_cosine:g} even with "
                      f"the {tried} most sensitive of {len(ranked)} weight nodes kept in float32")
