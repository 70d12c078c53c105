"""Export to ONNX and CoreML, quantization, parity checks and latency measurement (see the export issue)."""

__all__: list[str] = []
