"""Activation smoothing before dynamic int8: SmoothQuant's rescaling (Xiao et al., 2023) on an ONNX graph.

Dynamic quantization gives each activation tensor one int8 scale per call, set by its largest value. Pretrained
transformers (BERT-style text towers above all) carry a few channels whose values are 10-30x the rest, so that one
scale leaves the ordinary channels a handful of levels and full int8 misses the parity bound. Smoothing moves that
range into the weights, where per-channel quantization absorbs it: for a product `X @ W` with input channels j,

    s_j = max|X_j| ** alpha / max|W_j,:| ** (1 - alpha),    X @ W = (X / s) @ (diag(s) W)

with `max|X_j|` measured on calibration inputs. The values are unchanged in float; the division by `s` is folded
into the LayerNormalization that produces X when nothing else reads X (pre-norm transformers), otherwise one `Mul`
is inserted in front of the products that read X (post-norm BERT, whose norm output also feeds the residual, and
the GELU output before each MLP's second product). Products that share an input share its `s` (a layer's Q, K and V
projections), with `max|W_j,:|` taken over all of them.
"""

import tempfile
from pathlib import Path

import numpy as np

from export.graph import index_graph
from export.onnx_export import onnx_session

__all__ = ["activation_ranges", "smooth_activations", "SMOOTHING_ALPHAS"]

# Tried in order when full int8 misses its bound; SmoothQuant's default, then a stronger migration (the paper's
# choice for models with larger outliers).
SMOOTHING_ALPHAS = (0.5, 0.75)


def activation_ranges(source: str | Path, calibration: np.ndarray, input_name: str) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |value| of every activation tensor that a weight product of the ONNX file
    `source` reads, over `calibration`, a batch of real inputs (N, ...) for the graph input `input_name`. Measured
    once; `smooth_activations` takes them for each alpha."""
    import onnx

    model = onnx.load(str(source))
    products = _weight_products(model.graph, index_graph(model.graph))
    return _channel_absmax(model, list(products), calibration, input_name) if products else {}


def smooth_activations(source: str | Path, destination: str | Path, ranges: dict[str, np.ndarray],
                       alpha: float) -> int:
    """Write the smoothed copy of the ONNX file `source` to `destination`; returns how many activation tensors
    were smoothed. `ranges` are `activation_ranges` of the same file."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    index = index_graph(graph)
    initializers, producer, readers, graph_outputs = index.initializers, index.producer, index.readers, index.outputs
    products = _weight_products(graph, index)
    if not products:
        return 0

    smoothed = 0
    for name, users in products.items():
        weights = [numpy_helper.to_array(initializers[u.input[1]]) for u in users]  # (K, N) each
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)  # (K,)
        activation_max = ranges[name]
        usable = (activation_max > 0) & (weight_max > 0)
        scale = np.ones_like(activation_max)
        scale[usable] = activation_max[usable] ** alpha / weight_max[usable] ** (1 - alpha)
        scale = scale.astype(np.float32)
        for user, weight in zip(users, weights):
            initializers[user.input[1]].CopyFrom(numpy_helper.from_array(weight * scale[:, None], user.input[1]))
        norm = producer.get(name)
        if _foldable_norm(norm, name, users, readers, initializers, graph_outputs):
            for constant in [n for n in norm.input[1:3] if n]:  # scale, and bias when it has one
                value = numpy_helper.to_array(initializers[constant])
                initializers[constant].CopyFrom(numpy_helper.from_array(value / scale, constant))
        else:
            factor, out = f"{name}_smoothing", f"{name}_smoothed"
            graph.initializer.append(numpy_helper.from_array(1 / scale, factor))
            for user in users:
                user.input[0] = out
            first = min(list(graph.node).index(user) for user in users)
            graph.node.insert(first, helper.make_node("Mul", [name, factor], [out], name=f"{name}_smooth"))
        smoothed += 1
    onnx.save(model, str(destination))
    return smoothed


def _weight_products(graph, index) -> dict[str, list]:
    """Activation tensor -> the weight products that read it (MatMul, contrib Attention) whose 2-D weight no
    other node reads."""
    initializers, readers = index.initializers, index.readers
    products: dict[str, list] = {}
    for node in graph.node:
        is_product = node.op_type == "MatMul" or (node.op_type == "Attention" and node.domain == "com.microsoft")
        if (is_product and len(node.input) > 1 and node.input[0] not in initializers
                and node.input[1] in initializers and len(initializers[node.input[1]].dims) == 2
                and len(readers[node.input[1]]) == 1):
            products.setdefault(node.input[0], []).append(node)
    return products


def _foldable_norm(norm, name: str, users: list, readers: dict, initializers: dict, graph_outputs: set) -> bool:
    """Whether `1 / s` can go into the LayerNormalization `norm` that produces `name`: its output is read by the
    smoothed products alone, and its scale and bias are constants no other node reads."""
    if norm is None or norm.op_type != "LayerNormalization" or name in graph_outputs or norm.output[0] != name:
        return False
    if len(norm.output) > 1 and any(readers.get(o) or o in graph_outputs for o in norm.output[1:] if o):
        return False
    if any(reader not in users for reader in readers.get(name, [])):
        return False
    constants = [n for n in norm.input[1:] if n]
    return all(n in initializers and len(readers[n]) == 1 for n in constants)


def _channel_absmax(model, names: list[str], calibration: np.ndarray, input_name: str,
                    batch_size: int = 16) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |value| of the tensors `names` over the calibration batch."""
    import onnx
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "probe.onnx"
        onnx.save(probe, str(path))
        session = onnx_session(path)
        amax: dict[str, np.ndarray] = {}
        for start in range(0, len(calibration), batch_size):
            values = session.run(names, {input_name: calibration[start:start + batch_size]})
            for name, value in zip(names, values):
                batch_max = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                amax[name] = np.maximum(amax[name], batch_max) if name in amax else batch_max
    return amax
