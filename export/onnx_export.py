"""ONNX export of one tower through PyTorch's current exporter (`torch.onnx.export(..., dynamo=True)`).

Each file is a single self-contained `.onnx` (weights inside, no `.data` side file) with a dynamic batch axis,
checked with `onnx.checker` and then run in onnxruntime against the eager model before it counts as exported.

One rewrite follows the export (`sum_before_layer_norm`): an `Add` whose only reader is a `LayerNormalization`
becomes the equivalent `Sum`. onnxruntime's CPU provider otherwise fuses the pair into its contrib
`SkipLayerNormalization`, whose kernel is a scalar loop with a division per element, several times slower than
`Add` plus the vectorized `LayerNormalization` (docs/BENCHMARKS.md, "Export"). BERT-style post-norm text towers
have one such pair per sublayer; pre-norm towers have one, before the final norm.
"""

import logging
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from export.graph import index_graph
from export.parity import ExportError
from mdcore.errors import first_line

__all__ = ["export_onnx", "sum_before_layer_norm", "check_onnx", "onnx_session", "run_onnx", "count_ops"]

_OP_PATTERNS = (re.compile(r"op='(aten\.[A-Za-z0-9_]+)'"), re.compile(r"torch\.ops\.(aten\.[A-Za-z0-9_]+)"),
                re.compile(r"\b(aten::[A-Za-z0-9_]+)"))


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: str | Path, input_name: str, output_name: str,
                tower: str) -> Path:
    """Export `module(example)` to `path` with a dynamic batch axis; a failure names the tower and the operator."""
    import onnx

    path = Path(path)
    batch = torch.export.Dim("batch", min=1, max=4096)
    for name in ("onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=[input_name],
                              output_names=[output_name], dynamic_shapes={input_name: {0: batch}}, optimize=True,
                              external_data=False, verbose=False)
    except Exception as e:  # the exporter raises many types; all mean "this architecture does not export"
        op = _failing_operator(e)
        reason = f"operator {op} has no ONNX conversion" if op else first_line(e)
        raise ExportError(f"cannot export the {tower} tower to ONNX: {reason}") from e
    model = onnx.load(str(path))
    if sum_before_layer_norm(model):
        onnx.save(model, str(path))
    return path


def sum_before_layer_norm(model) -> int:
    """Turn every `Add` of two computed tensors (a residual sum) read only by a `LayerNormalization` into `Sum`,
    in place; returns how many.

    Same values (`Sum` broadcasts as `Add` does), but no longer the pattern onnxruntime fuses into its slow
    `SkipLayerNormalization` kernel (see the module docstring). Adds of a constant (biases) are left as they are,
    for the fusions that do pay (MatMul + bias into Gemm)."""
    graph = model.graph
    index = index_graph(graph)
    constants = set(index.initializers) | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    changed = 0
    for node in graph.node:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or node.output[0] in index.outputs \
                or any(name in constants for name in node.input):
            continue
        users = index.readers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "LayerNormalization" and users[0].input[0] == node.output[0]:
            node.op_type = "Sum"
            changed += 1
    return changed


def _failing_operator(error: BaseException) -> str | None:
    """The aten operator named anywhere in the exception chain (the exporter wraps the real error twice)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for pattern in _OP_PATTERNS:
            match = pattern.search(str(error))
            if match:
                return match.group(1).replace("::", ".")
        error = error.__cause__ or error.__context__
    return None


def check_onnx(path: str | Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"{Path(path).name} fails onnx.checker: {first_line(e)}") from e


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session with full graph optimization; `threads` sets the intra-op pool size."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run a one-input session over `inputs` in batches; returns the stacked first output."""
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: inputs[i:i + batch_size]})[0] for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outputs)


def count_ops(path: str | Path) -> dict[str, int]:
    """How often each operator type occurs in the main graph (decides convolutional vs transformer towers)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
