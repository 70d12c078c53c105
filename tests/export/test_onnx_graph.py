"""The rewrite every exported ONNX file gets: residual sums in front of a LayerNormalization become `Sum`, so that
onnxruntime does not fuse them into its slow SkipLayerNormalization kernel."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.onnx_export import onnx_session, sum_before_layer_norm


def _optimized_ops(path, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def test_residual_sums_before_layer_norm_become_sum(tmp_path):
    width = 16
    norm = [numpy_helper.from_array(np.ones(width, np.float32), "gamma"),
            numpy_helper.from_array(np.zeros(width, np.float32), "beta"),
            numpy_helper.from_array(np.linspace(-1, 1, width).astype(np.float32), "bias")]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["residual"], name="residual"),  # read by the norm alone: rewritten
         helper.make_node("LayerNormalization", ["residual", "gamma", "beta"], ["n1"], axis=-1),
         helper.make_node("Add", ["n1", "bias"], ["biased"], name="bias"),  # a constant operand: left alone
         helper.make_node("LayerNormalization", ["biased", "gamma", "beta"], ["n2"], axis=-1),
         helper.make_node("Add", ["n2", "x"], ["shared"], name="shared"),  # two readers: left alone
         helper.make_node("LayerNormalization", ["shared", "gamma", "beta"], ["n3"], axis=-1),
         helper.make_node("Add", ["n3", "shared"], ["out"], name="out")],
        "norms", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 8, width]) for n in ("x", "y")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 8, width])], norm)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "before.onnx"))
    assert "SkipLayerNormalization" in _optimized_ops(tmp_path / "before.onnx", tmp_path)  # what it prevents

    assert sum_before_layer_norm(model) == 1
    assert {n.name: n.op_type for n in model.graph.node if n.name} == {
        "residual": "Sum", "bias": "Add", "shared": "Add", "out": "Add"}
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(tmp_path / "after.onnx"))
    assert "SkipLayerNormalization" not in _optimized_ops(tmp_path / "after.onnx", tmp_path)
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((2, 8, width)).astype(np.float32) for n in ("x", "y")}
    before, after = (onnx_session(tmp_path / f"{n}.onnx").run(None, feed)[0] for n in ("before", "after"))
    np.testing.assert_allclose(after, before, atol=1e-5)


def test_exported_towers_run_without_skip_layer_norm(student_export, tmp_path):
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        ops = [n.op_type for n in onnx.load(str(student_export / name)).graph.node]
        assert "Sum" in ops  # each tower's final norm reads a residual sum
        assert "SkipLayerNormalization" not in _optimized_ops(student_export / name, tmp_path)
