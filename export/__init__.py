"""Export: ONNX, CoreML, ExecuTorch and LiteRT encoders checked against eager PyTorch, int8 quantization, latency.

`export_model(spec, out, ExportConfig(...))` writes an export directory and `bench_export(directory)` measures it.
The runtimes and converters (onnxruntime, coremltools, ExecuTorch, LiteRT) load on first use.
"""

import mdcore  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
from export.bench import BenchConfig, bench_export
from export.exporter import ExportConfig, export_loaded_model, export_model
from export.parity import ExportError, compare_embeddings
from export.towers import ImageEncoder, TextEncoder, prepare_for_export

__all__ = ["ExportConfig", "export_model", "export_loaded_model", "ExportError", "compare_embeddings", "ImageEncoder",
           "TextEncoder", "prepare_for_export", "BenchConfig", "bench_export"]
