"""Attention fusion before int8: the exported chain becomes onnxruntime's `Attention`, with the same outputs, and
nothing that differs from the chain is touched."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from export.fusion import fuse_attention, fuse_attention_file


def _run(path_or_model, x: np.ndarray) -> np.ndarray:
    data = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _tokens(batch: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    tokens = np.zeros((batch, 32), np.int32)  # md-student-tiny: context 32, end-of-text id 49407
    for row, length in enumerate(rng.integers(2, 30, batch)):
        tokens[row, 0], tokens[row, 1:length], tokens[row, length] = 49406, rng.integers(1, 49000, length - 1), 49407
    return tokens


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("tower, layers, unidirectional", [("text", 3, 1), ("image", 4, 0)])
def test_every_layer_fuses_with_the_same_outputs(student_export, tmp_path, tower, layers, unidirectional):
    source = student_export / f"{tower}_encoder.onnx"
    x = _tokens(5) if tower == "text" else np.random.default_rng(1).standard_normal((5, 3, 64, 64), np.float32)
    fused_path = tmp_path / "fused.onnx"
    assert fuse_attention_file(source, fused_path) == layers  # md-student-tiny: 3 text, 4 image layers
    before, after = _ops(onnx.load(str(source))), _ops(onnx.load(str(fused_path)))
    assert after["Attention"] == layers and "Softmax" not in after and sum(after.values()) < sum(before.values())
    attention = [n for n in onnx.load(str(fused_path)).graph.node if n.op_type == "Attention"]
    assert {helper.get_attribute_value(a) for n in attention for a in n.attribute if a.name == "unidirectional"} \
        == {unidirectional}  # the text tower's causal mask, none in the ViT
    np.testing.assert_allclose(_run(fused_path, x), _run(source, x), atol=1e-5)
    assert not {"model.attn_mask"} & {t.name for t in onnx.load(str(fused_path)).graph.initializer}


def test_other_masks_and_shared_values_are_left_alone(student_export):
    model = onnx.load(str(student_export / "text_encoder.onnx"))
    mask = next(t for t in model.graph.initializer if t.name == "model.attn_mask")
    banded = numpy_helper.to_array(mask).copy()
    banded[np.tril_indices(banded.shape[0], -4)] = -np.inf  # a local window: not expressible as unidirectional
    mask.CopyFrom(numpy_helper.from_array(banded, mask.name))
    expected = _run(model, _tokens(2))
    assert fuse_attention(model) == 0
    np.testing.assert_array_equal(_run(model, _tokens(2)), expected)

    model = onnx.load(str(student_export / "text_encoder.onnx"))
    first_softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    model.graph.output.append(helper.make_tensor_value_info(first_softmax.output[0], onnx.TensorProto.FLOAT, None))
    assert fuse_attention(model) == 2  # the layer whose attention weights are an output keeps its chain
    assert first_softmax in model.graph.node


def test_int8_towers_are_fused_and_say_so(student_export):
    report = json.loads((student_export / "export_report.json").read_text())
    for name, layers in (("text_encoder.int8.onnx", 3), ("image_encoder.int8.onnx", 4)):
        assert report["files"][name]["fused_attention"] == layers
        assert _ops(onnx.load(str(student_export / name)))["QAttention"] == layers
    assert "Attention" not in _ops(onnx.load(str(student_export / "text_encoder.onnx")))  # fp32 stays standard
    assert "`text_encoder.int8.onnx`" in (student_export / "README.md").read_text().split("QAttention")[0]
    tokens = _tokens(3)
    fp32, int8 = _run(student_export / "text_encoder.onnx", tokens), _run(student_export / "text_encoder.int8.onnx",
                                                                             tokens)
    assert (fp32 * int8).sum(axis=1).min() >= 0.99


def test_a_fused_copy_that_fails_its_check_falls_back_to_the_standard_graph(student_export, tmp_path):
    from export.quantize import quantize_within_bound

    fp32 = student_export / "text_encoder.onnx"

    def broken_fusion(path):  # the fused copy does not run; every quantized file passes
        if path.name == "fused.onnx":
            raise RuntimeError("onnxruntime cannot load it")
        return 1.0

    outcome = quantize_within_bound(fp32, tmp_path / "a.int8.onnx", "dynamic", broken_fusion, 0.99)
    assert outcome["fused_attention"] == 0 and "QAttention" not in _ops(onnx.load(str(tmp_path / "a.int8.onnx")))
    outcome = quantize_within_bound(fp32, tmp_path / "b.int8.onnx", "dynamic", lambda path: 1.0, 0.99)
    assert outcome["fused_attention"] == 3 and _ops(onnx.load(str(tmp_path / "b.int8.onnx")))["QAttention"] == 3
