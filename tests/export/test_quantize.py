"""int8 quantization: the method per tower kind, and the mixed-precision fallback when full int8 misses the bound."""

import onnx
import pytest
from onnx import TensorProto

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
