"""Export: ONNX and CoreML encoders checked against eager PyTorch, int8 quantization, latency, reports.

`export_model(spec, out, ExportConfig(...))` writes an export directory, `bench_export(directory)` measures it,
`write_report(run_dirs, out)` compares runs on one HTML page. Heavy dependencies (onnxruntime, coremltools) load
on first use.
"""

import importlib

_LAZY = {
    "ExportConfig": "export.exporter",
    "export_model": "export.exporter",
    "export_loaded_model": "export.exporter",
    "ExportError": "export.parity",
    "compare_embeddings": "export.parity",
    "ImageEncoder": "export.towers",
    "TextEncoder": "export.towers",
    "prepare_for_export": "export.towers",
    "BenchConfig": "export.bench",
    "bench_export": "export.bench",
    "write_report": "export.report",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
