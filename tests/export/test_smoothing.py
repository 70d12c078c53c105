"""Activation smoothing before dynamic int8: exact in float, folded into the norm when it can be, and what rescues
a tower with outlier channels that plain int8 cannot quantize within its bound."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import ExportError
from export.onnx_export import onnx_session
from export.quantize import quantize_onnx, quantize_within_bound
from export.smoothing import activation_ranges, smooth_activations

WIDTH, OUTLIERS = 64, [5, 40]


def _outlier_model(path, residual: bool):
    """LayerNorm whose output has two channels 40x larger than the rest (as pretrained BERTs have), read by two
    products (Q/K-like: one shared smoothing scale) and, with `residual`, by a residual add too."""
    rng = np.random.default_rng(0)
    gamma = np.ones(WIDTH, np.float32)
    gamma[OUTLIERS] = 40.0
    w1, w2 = (rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / 8 for _ in range(2))
    for w in (w1, w2):
        w[OUTLIERS] /= 40.0  # the outlier channels' weights are small, so every channel matters to the output
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="norm"),
             helper.make_node("MatMul", ["h", "w1"], ["a1"], name="product1"),
             helper.make_node("MatMul", ["h", "w2"], ["a2"], name="product2"),
             helper.make_node("Add", ["a1", "a2"], ["a"], name="merge")]
    if residual:
        nodes.append(helper.make_node("Add", ["a", "h"], ["out"], name="residual"))
    else:
        nodes.append(helper.make_node("Identity", ["a"], ["out"], name="out"))
    graph = helper.make_graph(
        nodes, "outliers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, WIDTH])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 8, WIDTH])],
        [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.zeros(WIDTH, np.float32), "beta"),
         numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _inputs(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 8, WIDTH)).astype(np.float32)


def _min_cosine(path, reference_path, x) -> float:
    out = onnx_session(path).run(None, {"x": x})[0].reshape(len(x), -1)
    ref = onnx_session(reference_path).run(None, {"x": x})[0].reshape(len(x), -1)
    return float(((out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)).min())


def test_smoothing_folds_into_the_norm_and_keeps_the_values(tmp_path):
    fp32 = _outlier_model(tmp_path / "fp32.onnx", residual=False)
    x = _inputs(16, 1)
    ranges = activation_ranges(fp32, _inputs(32, 2), "x")
    assert smooth_activations(fp32, tmp_path / "smoothed.onnx", ranges, alpha=0.5) == 1  # h, shared
    smoothed = onnx.load(str(tmp_path / "smoothed.onnx"))
    assert [n.op_type for n in smoothed.graph.node] == [n.op_type for n in onnx.load(str(fp32)).graph.node]
    gamma = numpy_helper.to_array(next(t for t in smoothed.graph.initializer if t.name == "gamma"))
    assert gamma[OUTLIERS].max() < 10 < 40  # the outliers' range moved into the weights
    assert _min_cosine(tmp_path / "smoothed.onnx", fp32, x) > 0.99999
    np.testing.assert_allclose(onnx_session(tmp_path / "smoothed.onnx").run(None, {"x": x})[0],
                               onnx_session(fp32).run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_a_norm_output_with_other_readers_gets_a_mul(tmp_path):
    fp32 = _outlier_model(tmp_path / "fp32.onnx", residual=True)
    ranges = activation_ranges(fp32, _inputs(32, 2), "x")
    assert smooth_activations(fp32, tmp_path / "smoothed.onnx", ranges, alpha=0.5) == 1
    graph = onnx.load(str(tmp_path / "smoothed.onnx")).graph
    mul = next(n for n in graph.node if n.op_type == "Mul")
    readers = [n.name for n in graph.node if mul.output[0] in n.input]
    assert mul.input[0] == "h" and sorted(readers) == ["product1", "product2"]
    assert next(n for n in graph.node if n.name == "residual").input[1] == "h"  # the residual reads the norm as is
    x = _inputs(16, 1)
    np.testing.assert_allclose(onnx_session(tmp_path / "smoothed.onnx").run(None, {"x": x})[0],
                               onnx_session(fp32).run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_smoothing_rescues_int8_where_outliers_defeat_it(tmp_path):
    fp32 = _outlier_model(tmp_path / "fp32.onnx", residual=False)
    x = _inputs(16, 1)
    plain = _min_cosine(quantize_onnx(fp32, tmp_path / "plain.int8.onnx", "dynamic", per_channel=True), fp32, x)
    smooth_activations(fp32, tmp_path / "smoothed.onnx", activation_ranges(fp32, _inputs(32, 2), "x"), alpha=0.5)
    smoothed = _min_cosine(quantize_onnx(tmp_path / "smoothed.onnx", tmp_path / "smoothed.int8.onnx", "dynamic",
                                         per_channel=True), fp32, x)
    assert plain < 0.99 < smoothed

    calibration = [c[None] for c in _inputs(32, 2)]
    outcome = quantize_within_bound(fp32, tmp_path / "tower.int8.onnx", "dynamic",
                                    lambda path: _min_cosine(path, fp32, x), 0.99, calibration, "x")
    assert outcome["smoothing_alpha"] == 0.5 and outcome["smoothed_activations"] == 1
    assert outcome["excluded_nodes"] == [] and outcome["min_cosine"] >= 0.99
    with pytest.raises(ExportError, match="misses its parity bound"):  # no calibration inputs, no smoothing
        quantize_within_bound(fp32, tmp_path / "plain.int8.onnx", "dynamic", lambda path: _min_cosine(path, fp32, x),
                              0.99)
