"""int8 quantization: the method per tower kind, and the mixed-precision fallback when full int8 misses the bound."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import ExportError
from export.quantize import quantization_method, quantize_onnx, quantize_within_bound, weight_nodes


def _int8_weights(path) -> int:
    return sum(t.data_type == TensorProto.INT8 and len(t.dims) == 2
               for t in onnx.load(str(path)).graph.initializer)


def test_transformer_towers_get_dynamic_quantization(student_export):
    assert quantization_method(student_export / "image_encoder.onnx", "image") == "dynamic"  # a ViT: one Conv
    assert quantization_method(student_export / "text_encoder.onnx", "text") == "dynamic"


def test_most_sensitive_nodes_stay_float_until_the_bound_holds(student_export, tmp_path):
    fp32 = student_export / "text_encoder.onnx"
    nodes = weight_nodes(fp32, "dynamic")
    assert len(nodes) >= 4

    def min_cosine_of(path):  # a stand-in score: every int8 weight costs 0.001
        return 1.0 - 0.001 * _int8_weights(path)

    full = _int8_weights(quantize_onnx(fp32, tmp_path / "full.int8.onnx", "dynamic"))
    bound = 1.0 - 0.001 * (full - 3) + 1e-9  # needs at least 3 nodes kept in float32
    outcome = quantize_within_bound(fp32, tmp_path / "text.int8.onnx", "dynamic", min_cosine_of, bound)
    assert outcome["per_channel"] and len(outcome["excluded_nodes"]) == 4  # tries 1, 2, then 4
    assert _int8_weights(tmp_path / "text.int8.onnx") == full - 4
    with pytest.raises(ExportError, match="misses its parity bound"):
        quantize_within_bound(fp32, tmp_path / "never.int8.onnx", "dynamic", lambda path: 0.5, 0.99)
    assert not (tmp_path / "never.int8.onnx").exists()


def _conv_block(path):
    """A MobileCLIP-like block: a residual add in front of a depthwise convolution."""
    rng = np.random.default_rng(0)
    weights = {"dense_w": rng.standard_normal((8, 8, 1, 1)), "depthwise_w": rng.standard_normal((8, 1, 3, 3)),
               "out_w": rng.standard_normal((8, 8, 1, 1))}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "dense_w"], ["a"], name="dense"),
         helper.make_node("Add", ["a", "image"], ["r"], name="residual"),
         helper.make_node("Conv", ["r", "depthwise_w"], ["b"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["b", "out_w"], ["o"], name="out"),
         helper.make_node("Add", ["o", "r"], ["out"], name="skip")],
        "convs", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 6, 6])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _calibration(scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [scale * rng.standard_normal((1, 8, 6, 6)).astype(np.float32) for _ in range(4)]


def test_static_quantization_leaves_grouped_convolutions_float(tmp_path):
    fp32 = _conv_block(tmp_path / "convs.onnx")
    assert weight_nodes(fp32, "static_qdq") == ["dense", "out"]
    calibration = _calibration()
    int8 = onnx.load(str(quantize_onnx(fp32, tmp_path / "convs.int8.onnx", "static_qdq", calibration)))
    producer = {name: node.op_type for node in int8.graph.node for name in node.output}
    convs = {node.name: node for node in int8.graph.node if node.op_type == "Conv"}
    assert producer[convs["dense"].input[1]] == producer[convs["out"].input[1]] == "DequantizeLinear"
    # The depthwise conv takes the float sum (no DequantizeLinear, which would make onnxruntime quantize the conv's
    # weight itself), though the int8 add "skip" reads that sum through a quantize-dequantize pair.
    assert list(convs["depthwise"].input[:2]) == ["r", "depthwise_w"] and producer["r"] == "Add"
    skip = next(node for node in int8.graph.node if node.name == "skip")
    assert [producer[name] for name in skip.input] == ["DequantizeLinear", "DequantizeLinear"]
    import onnxruntime as ort  # the rewired graph still loads and stays close to the float one

    x = calibration[0]
    ref, out = (ort.InferenceSession(str(path)).run(None, {"image": x})[0].ravel()
                for path in (fp32, tmp_path / "convs.int8.onnx"))
    assert out @ ref / (np.linalg.norm(out) * np.linalg.norm(ref)) > 0.99


def test_static_probes_reuse_the_calibrated_ranges(tmp_path):
    """The sensitivity search quantizes the same file once per weight node: with a cache directory the graph is
    pre-processed and calibrated once, and later calls read those ranges whatever calibration they are given."""
    fp32 = _conv_block(tmp_path / "convs.onnx")

    def input_scale(path) -> float:
        graph = onnx.load(str(path)).graph
        dequantize = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("image"))
        return float(numpy_helper.to_array(next(t for t in graph.initializer if t.name == dequantize.input[1])))

    first = quantize_onnx(fp32, tmp_path / "first.onnx", "static_qdq", _calibration(), cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("convs.*")) == ["convs.onnx", "convs.prepared.onnx",
                                                                 "convs.ranges.json"]
    probe = quantize_onnx(fp32, tmp_path / "probe.onnx", "static_qdq", _calibration(100.0), cache_dir=tmp_path,
                          nodes_to_quantize=["dense"])
    fresh = quantize_onnx(fp32, tmp_path / "fresh.onnx", "static_qdq", _calibration(100.0))
    assert input_scale(probe) == input_scale(first) != input_scale(fresh)
