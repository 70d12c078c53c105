"""Android's two runtimes: ExecuTorch programs (`.pte`) and LiteRT flatbuffers (`.tflite`), both on XNNPACK.

    executorch_float(module, example) -> program     torch.export, once per tower
    executorch_int8(program, method, calibration)     PT2E int8 of it: a reference model that runs in PyTorch
    run_reference(int8 model, inputs)                 its outputs, to check a method before lowering it
    to_executorch(program or int8 model, path)        -> XNNPACK partition -> .pte
    litert_float(module, example) -> flatbuffer       litert-torch, once per tower
    to_litert(flatbuffer, path, method, calibration)  [ai-edge-quantizer int8] -> .tflite

The float conversion is made once per tower and every file and int8 attempt starts from it; an XNNPACK lowering is
most of an export's time (docs/BENCHMARKS.md, "Phones"), so an int8 method is checked in PyTorch before it is
lowered. `method` is None (float32), "dynamic" (int8 weights per channel, activations quantized at run time),
"static" (int8 activations too, ranges from the calibration inputs) or "dynamic_matmul" (dynamic, matrix products
only: convolutions stay float, the fallback for convolutional towers whose activations neither static nor dynamic
int8 of every convolution keeps within the bound). Both writers return what ran outside the XNNPACK delegate:
`{"delegated_nodes", "nodes_outside_delegate", "ops_outside_delegate": {op: count}, ...}`.

`for_xnnpack(encoder, fmt)` rewrites a tower (on a copy, same values) so that more of it runs inside XNNPACK. What
each runtime's XNNPACK leaves outside, found on md-student-tiny's towers:
- ExecuTorch 1.5 delegates no layer norm and no reduction over the last axis (sum, mean), and lowers a 4-D matrix
  product to an `expand_copy` of each operand before a 3-D one. So layer norms compute their mean and variance as a
  fully connected layer against a constant averaging row, the L2 norm sums its squares the same way, and attention
  multiplies (B * heads, L, d) batches and slices Q, K, V apart instead of splitting them (what stays outside,
  before and after: docs/BENCHMARKS.md, "Phones").
  timm's attention (MobileCLIP's FastViT stages) is switched from `scaled_dot_product_attention`, whose exported
  form guards all-masked rows with `any` / `eq` / `where` outside XNNPACK, to its written-out softmax.
- LiteRT delegates all of that but the `POW` of `F.normalize`: the L2 norm multiplies instead (1 node to 0).

Why these quantizers: ExecuTorch's own XNNPACKQuantizer is the one its XNNPACK partitioner matches. For LiteRT,
ai-edge-quantizer works on the converted flatbuffer; PT2E's dynamic int8 quantizes a text tower's embedding table
with a nonzero zero point, which LiteRT's interpreter refuses.
"""

import copy
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm as OpenClipLayerNorm
from torch import nn

from export.parity import ExportError
from export.runtimes import quiet_native
from export.towers import ExportableSelfAttention
from mdcore.errors import first_line
from mdmodels.attention import written_out_attention

__all__ = ["executorch_float", "executorch_int8", "run_reference", "to_executorch", "litert_float", "to_litert",
           "for_xnnpack", "QUANTIZATION_METHODS"]

QUANTIZATION_METHODS = ("dynamic", "static", "dynamic_matmul")


class _SumOfSquares(nn.Module):
    """Sum of squares over the last axis, (..., D) -> (..., 1), as a fully connected layer against a row of ones
    (ExecuTorch's XNNPACK runs no last-axis reduction). Kept float by the int8 quantizer."""

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__()
        self.register_buffer("row", torch.full((1, dim), scale), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * x, self.row)


class _UnitEmbedding(nn.Module):
    """An encoder whose L2 normalization XNNPACK runs: x / max(|x|, 1e-12), as F.normalize, from multiplications."""

    def __init__(self, encoder: nn.Module, dim: int, as_linear: bool):
        super().__init__()
        self.encoder = encoder
        self.squares = _SumOfSquares(dim) if as_linear else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.encoder.embed(x)  # (B, D)
        squares = self.squares(embedding) if self.squares is not None else (embedding * embedding).sum(-1, True)
        return embedding * torch.rsqrt(squares.clamp_min(1e-24))


class _RowStatLayerNorm(nn.LayerNorm):
    """LayerNorm over the last axis whose mean and variance are fully connected layers against a constant
    averaging row, so that XNNPACK (ExecuTorch 1.5) runs it; same values in float."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean_of(x)  # (..., 1)
        centered = x - mean
        variance = self.mean_of.squared(centered)
        out = centered * torch.rsqrt(variance + self.eps)
        return out * self.weight + self.bias if self.weight is not None else out


class _LastAxisMean(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("row", torch.full((1, dim), 1.0 / dim), persistent=False)
        self.squared = _SumOfSquares(dim, 1.0 / dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.row)


class _BatchedSelfAttention(ExportableSelfAttention):
    """ExportableSelfAttention with (B * heads, L, d) matrix products and Q, K, V sliced apart: ExecuTorch lowers
    4-D products and splits through copies outside XNNPACK."""

    def attend(self, qkv: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        return written_out_attention(qkv, self.num_heads, qkv.shape[2] // 3 // self.num_heads, attn_mask,
                                     batched_3d=True)


def _plain_layer_norm(module: nn.Module) -> bool:
    """nn.LayerNorm or open_clip's float-casting subclass over the last axis; not timm's LayerNorm2d and other
    subclasses that permute first."""
    return type(module) in (nn.LayerNorm, OpenClipLayerNorm) and len(module.normalized_shape) == 1


def for_xnnpack(encoder: nn.Module, fmt: str, dim: int) -> nn.Module:
    """A copy of `encoder` (an ImageEncoder or TextEncoder) rewritten so that `fmt`'s XNNPACK runs more of it
    (see the module docstring); the caller's encoder is untouched."""
    encoder = copy.deepcopy(encoder).eval()
    if fmt == "executorch":
        for module in encoder.modules():
            if getattr(module, "fused_attn", None) is True:  # timm: the written-out softmax attention, not SDPA,
                module.fused_attn = False  # whose export adds an all-masked-row guard (any, eq, where) per layer
            config = getattr(module, "config", None)  # Hugging Face towers: the same, by their config
            if getattr(config, "_attn_implementation", None) == "sdpa":
                config._attn_implementation = "eager"
            if type(module) is ExportableSelfAttention:
                module.__class__ = _BatchedSelfAttention
            elif _plain_layer_norm(module):
                module.__class__ = _RowStatLayerNorm
                module.mean_of = _LastAxisMean(module.normalized_shape[0])
    return _UnitEmbedding(encoder, dim, as_linear=fmt == "executorch").eval()


def executorch_float(module: torch.nn.Module, example: torch.Tensor, name: str) -> torch.export.ExportedProgram:
    """`module(example)` (batch 1) through torch.export: what the float `.pte` lowers and each int8 method
    quantizes (lowering and quantization work on copies, so one program serves them all)."""
    try:
        with warnings.catch_warnings(), torch.no_grad(), quiet_native():
            warnings.simplefilter("ignore")
            return torch.export.export(module.eval(), (example,))
    except Exception as e:  # torch.export raises many types; all mean "does not export"
        raise ExportError(f"cannot export {name} for ExecuTorch: {first_line(e)}") from e


def executorch_int8(program: torch.export.ExportedProgram, method: str, calibration: list[torch.Tensor],
                    keep_float: tuple[str, ...] = ()) -> torch.fx.GraphModule:
    """PT2E int8 of `program` by XNNPACK's quantizer: the quantize/dequantize reference model, which runs in PyTorch
    with the int8 values the lowered program computes with, so a method can be checked before it is lowered.
    `keep_float` names modules (as `named_modules` does) whose operators stay float."""
    try:
        with warnings.catch_warnings(), torch.no_grad(), quiet_native():
            warnings.simplefilter("ignore")
            return _pt2e_int8(program.module(), method, calibration, keep_float)
    except Exception as e:
        raise ExportError(f"XNNPACK's quantizer could not make {method} int8: {first_line(e)}") from e


def run_reference(model: torch.fx.GraphModule, inputs: torch.Tensor) -> np.ndarray:
    """An int8 reference model's outputs for `inputs` (N, ...), one at a time (its program is exported at batch 1)."""
    try:
        with torch.no_grad():
            return torch.cat([model(x[None]) for x in inputs]).numpy()
    except Exception as e:
        raise ExportError(f"the int8 reference model does not run: {first_line(e)}") from e


def to_executorch(model: torch.export.ExportedProgram | torch.fx.GraphModule, example: torch.Tensor,
                  path: str | Path) -> dict[str, Any]:
    """Lower a float program (`executorch_float`) or an int8 reference model (`executorch_int8`, exported again at
    `example`'s shape) to an XNNPACK-delegated ExecuTorch program at `path`."""
    with quiet_native():  # their imports print notices of their own
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.devtools.backend_debug import get_delegation_info
        from executorch.exir import to_edge_transform_and_lower

    try:
        with warnings.catch_warnings(), torch.no_grad(), quiet_native():
            warnings.simplefilter("ignore")
            program = model if isinstance(model, torch.export.ExportedProgram) else torch.export.export(
                model, (example,))
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            info = get_delegation_info(edge.exported_program().graph_module)
            Path(path).write_bytes(edge.to_executorch().buffer)
    except ExportError:
        raise
    except Exception as e:  # torch.export and the lowering raise many types; all mean "does not lower"
        raise ExportError(f"cannot lower {Path(path).name} to ExecuTorch: {first_line(e)}") from e
    outside = {op: b.non_delegated for op, b in info.delegation_by_operator.items()
               if b.non_delegated and op != "getitem"}  # getitem only unpacks a delegate's outputs
    return {"delegate": "xnnpack", "delegated_subgraphs": info.num_delegated_subgraphs,
            "delegated_nodes": info.num_delegated_nodes, "nodes_outside_delegate": sum(outside.values()),
            "ops_outside_delegate": dict(sorted(outside.items()))}


def _pt2e_int8(graph_module, method: str, calibration: list[torch.Tensor], keep_float: tuple[str, ...] = ()):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    _integer_scalar_arithmetic_as_scalar_ops(graph_module)
    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=method != "static"))
    for statistic in (_SumOfSquares, _LastAxisMean):  # norms' statistics stay float
        quantizer.set_module_type(statistic, None)
    if method == "dynamic_matmul":
        quantizer.set_module_type(nn.Conv2d, None)
    if keep_float:
        def outside_kept_modules(node) -> bool:
            paths = [v[0] for v in node.meta.get("nn_module_stack", {}).values()]
            return not any(p == m or p.startswith(m + ".") for p in paths for m in keep_float)

        quantizer.set_filter_function(outside_kept_modules)
    prepared = prepare_pt2e(graph_module, quantizer)
    for x in calibration if method == "static" else calibration[:1]:
        prepared(x)
    return convert_pt2e(prepared)


def _integer_scalar_arithmetic_as_scalar_ops(graph_module) -> None:
    """`int tensor + 3` as `aten.add.Scalar`, in place: prepare_pt2e turns the scalar operand of `add.Tensor` and
    `mul.Tensor` into a float32 tensor constant, which makes index arithmetic (Hugging Face's attention-mask
    positions) float and the calibration run fail."""
    aten = torch.ops.aten
    scalar_forms = {aten.add.Tensor: aten.add.Scalar, aten.sub.Tensor: aten.sub.Scalar,
                    aten.mul.Tensor: aten.mul.Scalar}
    changed = False
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in scalar_forms or len(node.args) < 2:
            continue
        value = getattr(node.args[0], "meta", {}).get("val")
        if isinstance(node.args[1], int | bool) and value is not None and not value.dtype.is_floating_point \
                and not node.kwargs:
            node.target = scalar_forms[node.target]
            changed = True
    if changed:
        graph_module.recompile()


def litert_float(module: torch.nn.Module, example: torch.Tensor, name: str) -> bytes:
    """`module(example)` (batch 1) as a float LiteRT flatbuffer through litert-torch: what the float `.tflite` is
    and each int8 method quantizes."""
    with quiet_native():  # its import prints notices of its own
        import litert_torch

    try:
        with warnings.catch_warnings(), torch.no_grad(), quiet_native():
            warnings.simplefilter("ignore")
            return litert_torch.convert(module.eval(), (example,)).model_content()
    except Exception as e:  # the converter raises many types; all mean "this tower does not convert"
        raise ExportError(f"cannot convert {name} to LiteRT: {first_line(e)}") from e


def to_litert(content: bytes, path: str | Path, method: str | None = None,
              calibration: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Write a float flatbuffer (`litert_float`), or its int8 by ai-edge-quantizer, to `path`."""
    path = Path(path)
    if method is not None:
        with quiet_native():
            content = _ai_edge_int8(content, method, calibration)
    path.write_bytes(content)
    with quiet_native():
        return litert_delegation(path)


def _ai_edge_int8(content: bytes, method: str, calibration: list[torch.Tensor]) -> bytes:
    from ai_edge_quantizer import qtyping, quantizer, recipe

    try:
        if method == "dynamic":
            q = quantizer.Quantizer(content, recipe.dynamic_wi8_afp32())
            return bytes(q.quantize().quantized_model)
        if method == "dynamic_matmul":
            fully_connected = recipe.dynamic_wi8c_afp32(operation_name=qtyping.TFLOperationName.FULLY_CONNECTED)
            return bytes(quantizer.Quantizer(content, fully_connected).quantize().quantized_model)
        q = quantizer.Quantizer(content, recipe.static_wi8_ai8())
        key, name = _signature_input(content)
        ranges = q.calibrate({key: [{name: x.numpy()} for x in calibration]}, num_threads=os.cpu_count() or 1)
        return bytes(q.quantize(ranges).quantized_model)
    except Exception as e:
        raise ExportError(f"ai-edge-quantizer could not make {method} int8: {first_line(e)}") from e


def _signature_input(content: bytes) -> tuple[str, str]:
    """The flatbuffer's signature key and its one input's name (litert-torch writes serving_default / args_0)."""
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_content=content).get_signature_list()
    key = next(iter(signatures))
    return key, signatures[key]["inputs"][0]


def litert_delegation(path: Path) -> dict[str, Any]:
    """What XNNPACK takes of a `.tflite`: with delegate-node fusion off every delegated op becomes a DELEGATE node
    of its own producing that op's outputs, so the ops outside are those whose outputs no DELEGATE node makes."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1, experimental_disable_delegate_node_fusion=True)
    interpreter.allocate_tensors()
    ops = interpreter._get_ops_details()  # the original ops, then the DELEGATE nodes that replaced some of them
    delegated_outputs = {int(t) for op in ops if op["op_name"] == "DELEGATE" for t in op["outputs"]}
    originals = [op for op in ops if op["op_name"] != "DELEGATE"]
    outside = Counter(op["op_name"] for op in originals
                      if not any(int(t) in delegated_outputs for t in op["outputs"] if int(t) >= 0))
    return {"delegate": "xnnpack", "delegated_nodes": len(originals) - sum(outside.values()),
            "nodes_outside_delegate": sum(outside.values()), "ops_outside_delegate": dict(sorted(outside.items()))}
