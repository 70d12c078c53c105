"""Fuse the exported self-attention into onnxruntime's `com.microsoft.Attention` before dynamic int8 quantization.

`ExportableSelfAttention` traces each layer to one short chain:

    x -> MatMul(W_qkv) -> Add(b_qkv) -> Split(3) -> Reshape x3 -> Transpose x3 (K to (B, H, D, L))
      -> Mul(q, scale) -> MatMul(q, k) [-> Add(causal mask)] -> Softmax -> MatMul(., v) -> Transpose -> Reshape

which is exactly what onnxruntime's contrib `Attention` op computes (packed QKV weights in q, k, v order, per-head
scaling, `unidirectional=1` for a causal mask). Replacing the chain by that one node is what onnxruntime's own
transformer tooling does before quantizing BERT-style models: `quantize_dynamic` then turns each `Attention` into a
`QAttention` (int8 QKV product and attention in one kernel), instead of ~14 small nodes per layer whose fixed cost
int8 does not shrink. Contrib ops run in onnxruntime (including its mobile packages) only, so the fp32 export
keeps the standard-op graph and only the int8 file, onnxruntime-specific anyway, is fused.

Anything that differs from the chain (another mask than the causal one, extra consumers of an intermediate value,
a non-constant weight) is left as it is.
"""

from pathlib import Path

import numpy as np

from export.graph import index_graph

__all__ = ["fuse_attention", "fuse_attention_file"]

_HEADS_FIRST, _KEYS_TRANSPOSED = [0, 2, 1, 3], [0, 2, 3, 1]


class _NoMatch(Exception):
    pass


def _expect(condition) -> None:
    if not condition:
        raise _NoMatch


def fuse_attention(model) -> int:
    """Rewrite `model` (an `onnx.ModelProto`) in place; returns how many attention layers were fused."""
    from onnx import helper, numpy_helper

    graph = model.graph
    index = index_graph(graph)
    initializers, producer, consumers, graph_outputs = index.initializers, index.producer, index.readers, index.outputs

    def constant(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(initializers[name]) if name in initializers else None

    def constant_operand(node) -> tuple[str, np.ndarray, str]:
        """The constant input of a two-input node, either side (name and value), and the other input's name."""
        for side in (1, 0):
            if node.input[side] in initializers:
                return node.input[side], constant(node.input[side]), node.input[1 - side]
        raise _NoMatch

    def made_by(name: str, op_type: str):
        node = producer.get(name)
        _expect(node is not None and node.op_type == op_type)
        return node

    def sole_consumer(name: str, op_type: str):
        users = consumers.get(name, [])
        _expect(len(users) == 1 and users[0].op_type == op_type and name not in graph_outputs)
        return users[0]

    def perm(node) -> list[int]:
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])

    def match(softmax) -> dict:
        before = producer.get(softmax.input[0])
        _expect(before is not None)
        masked = before.op_type == "Add"
        scores = before
        if masked:  # only the causal mask maps onto `unidirectional`
            _, mask, scores_name = constant_operand(before)
            _expect(mask.ndim == 2 and mask.shape[0] == mask.shape[1])
            _expect(np.array_equal(mask, np.triu(np.full(mask.shape, -np.inf, dtype=mask.dtype), 1)))
            scores = made_by(scores_name, "MatMul")
        _expect(scores.op_type == "MatMul")
        scale_q, k = made_by(scores.input[0], "Mul"), made_by(scores.input[1], "Transpose")
        _, scale, q_name = constant_operand(scale_q)
        q = made_by(q_name, "Transpose")
        _expect(scale.size == 1 and perm(q) == _HEADS_FIRST and perm(k) == _KEYS_TRANSPOSED)
        weighted = sole_consumer(softmax.output[0], "MatMul")
        v = made_by(weighted.input[1], "Transpose")
        merge = sole_consumer(weighted.output[0], "Transpose")
        _expect(perm(v) == _HEADS_FIRST and perm(merge) == _HEADS_FIRST)
        out = sole_consumer(merge.output[0], "Reshape")
        heads_shape = [made_by(t.input[0], "Reshape") for t in (q, k, v)]
        split = made_by(heads_shape[0].input[0], "Split")
        _expect([r.input[0] for r in heads_shape] == list(split.output))
        shape = constant(heads_shape[0].input[1])
        _expect(shape is not None and shape.size == 4)
        projection = producer.get(split.input[0])
        _expect(projection is not None)
        bias = None
        if projection.op_type == "Add":
            add = projection
            bias, bias_value, product = constant_operand(add)
            _expect(bias_value.ndim == 1)
            projection = made_by(product, "MatMul")
        _expect(projection.op_type == "MatMul" and projection.input[1] in initializers)
        chain = [projection] + ([add] if bias else []) + [split, *heads_shape, q, k, v, scale_q, scores] + \
            ([before] if masked else []) + [softmax, weighted, merge, out]
        inside = {name for node in chain for name in node.output} - {out.output[0]}
        _expect(not inside & graph_outputs)
        _expect(all(user in chain for name in inside for user in consumers.get(name, [])))
        return {"chain": chain, "projection": projection, "bias": bias, "heads": int(shape[2]),
                "scale": float(scale.reshape(())), "unidirectional": int(masked), "output": out.output[0]}

    fused = 0
    for softmax in [node for node in graph.node if node.op_type == "Softmax"]:
        try:
            found = match(softmax)
        except _NoMatch:
            continue
        projection, bias = found["projection"], found["bias"]
        if bias is None:  # Attention's bias input is required
            bias = f"{projection.name}_zero_bias"
            width = initializers[projection.input[1]].dims[-1]
            graph.initializer.append(numpy_helper.from_array(np.zeros(width, np.float32), bias))
        attention = helper.make_node(
            "Attention", [projection.input[0], projection.input[1], bias], [found["output"]],
            name=f"{projection.name}_attention", domain="com.microsoft", num_heads=found["heads"],
            unidirectional=found["unidirectional"], scale=found["scale"])
        position = list(graph.node).index(projection)
        for node in found["chain"]:
            graph.node.remove(node)
        graph.node.insert(position, attention)
        fused += 1
    if fused:
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        used = {name for node in graph.node for name in node.input} | graph_outputs
        for tensor in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(tensor)  # the masks, head shapes and scales the chain used
    return fused


def fuse_attention_file(source: str | Path, destination: str | Path) -> int:
    """Write the fused copy of the ONNX file `source` to `destination`; returns how many layers were fused."""
    import onnx

    model = onnx.load(str(source))
    fused = fuse_attention(model)
    onnx.save(model, str(destination))
    return fused
