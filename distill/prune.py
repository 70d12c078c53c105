"""Automatic weight inheritance: learnable masks decide which channels, heads and MLP units of a model to keep.

TinyCLIP's automatic inheritance (Wu et al., ICCV 2023), after CoFi pruning (Xia et al., ACL 2022) and L0
regularization (Louizos et al., ICLR 2018). The student starts as a copy of its source model; every open_clip
transformer tower (vision and text) gets hard-concrete gates on
  - its residual width (one gate per channel, shared by all layers of the tower),
  - the heads of each layer, and
  - the MLP hidden units of each layer.

A gate z in [0, 1] with parameter log_alpha is drawn as
    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  z = clamp(s * (r - l) + l, 0, 1)
with beta = 2/3, l = -0.1, r = 1.1; it is exactly 0 with probability Q(0) = sigmoid(beta * log(-l / r) - log_alpha),
so P(z != 0) = sigmoid(log_alpha - beta * log(-l / r)). The expected parameter count of both towers is the
parameter count as a function of the kept widths (`TowerShape.count`), evaluated at the expected widths (exact:
the count is linear in each layer's widths and the gates are independent). Which parameters count is the basis:
  - "layers" (the default, TinyCLIP's and CoFi's): the transformer layers' attention and MLP matrices, what the
    compute of both towers follows; embeddings, norms and projections are not counted;
  - "all": every tower parameter. A text tower's token embedding (vocabulary x width, a table lookup) then
    dominates and the masks buy most of the sparsity by narrowing the text tower, so the parameters drop while
    the image tower's latency barely moves (measured in docs/BENCHMARKS.md).
With p = 1 - E[counted params] / reference (the original model's, carried across stages) and the target q rising
linearly from the start value over a warm-up, training minimizes

    loss + lambda_1 * (q - p) + lambda_2 * (q - p) ** 2

over the model and the log_alphas and maximizes it over lambda_1 and lambda_2 (gradient ascent).

Masked towers are made prunable first: their blocks become `mdmodels.variable_width.VariableWidthBlock`s (same parameter
names and math as open_clip's blocks) and their LayerNorms `MaskedLayerNorm`s, which normalize over the kept
channels only. So the gates act as if the pruned channels were gone: every read of the residual stream goes through
such a LayerNorm, and what is written into pruned channels is never read. At the prune step the gates become
deterministic (in each group the round(expected count) gates with the largest log_alpha stay, at 1; at least one
per group; one offset common to every log_alpha is searched so that the count meets the target even when the
constraint has not fully converged, keeping the learned ranking) and `prune_model` slices the weights into a
smaller model with those widths: not zeros, fewer rows and columns. Its config carries per-layer head counts and
MLP widths (`mdmodels.variable_width`).
"""

import copy
import math
import re
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
from torch import nn

from mdcore.errors import UserInputError
from mdmodels.model_dir import read_provenance
from mdmodels.specs import parse_model_spec
from mdmodels.variable_width import VariableWidthBlock

__all__ = ["BETA", "LIMIT_LEFT", "LIMIT_RIGHT", "sample_hard_concrete", "keep_probability", "MaskedLayerNorm",
           "TowerShape", "tower_shapes", "tower_parameter_count", "counted_parameters", "COUNT_BASES", "L0Masks",
           "attach_masks", "prune_model", "source_pruning"]

BETA, LIMIT_LEFT, LIMIT_RIGHT = 2 / 3, -0.1, 1.1
_EPS = 1e-6
COUNT_BASES = ("layers", "all")
_LOG_ALPHA_RANGE = (-10.0, 10.0)


def sample_hard_concrete(log_alpha: torch.Tensor) -> torch.Tensor:
    """One draw of the stretched, clamped hard-concrete gates (same shape as `log_alpha`); differentiable."""
    u = torch.rand_like(log_alpha).clamp(_EPS, 1 - _EPS)
    s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / BETA)
    return (s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0)


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) = 1 - Q(0), Q the CDF of the stretched concrete: sigmoid(log_alpha - beta * log(-l / r))."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LIMIT_LEFT / LIMIT_RIGHT))


class MaskedLayerNorm(open_clip.transformer.LayerNorm):
    """LayerNorm over the channels a gate vector keeps: statistics weighted by `mask`, output multiplied by it.

    With a 0/1 mask this is exactly the LayerNorm of the kept channels (zeros elsewhere), so the masked tower
    computes what the sliced one will. Without a mask it is open_clip's LayerNorm."""

    mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return super().forward(x)
        z = self.mask  # (D,)
        count = z.sum()
        centered = x - (x @ z).unsqueeze(-1) / count  # (..., D), the gate-weighted mean removed
        var = (centered * centered) @ z / count  # (...,)
        normed = centered * torch.rsqrt(var + self.eps).unsqueeze(-1)  # (..., D)
        return torch.addcmul(self.bias * z, normed, self.weight * z)  # gates folded into the affine part


# ------------------------------------------------------------------------------------------------ tower structure


@dataclass
class TowerShape:
    """How one tower's parameter count depends on its widths:

        count = width * per_channel + sum_l (4 * head_dim * width * heads_l + 3 * head_dim * heads_l
                                             + 2 * width * mlp_l + mlp_l) + constant

    (q, k, v and output projections; MLP in and out; their biases; `per_channel` gathers embeddings, norms,
    residual-side biases and the final projection, each one row or column per channel)."""

    name: str  # "vision" or "text"
    prefix: str  # the tower's parameter-name prefix in the model ("visual.", "text." or "" for CLIP's text)
    width: int
    head_dim: int
    heads: list[int]
    mlp: list[int]
    per_channel: int = 0
    constant: int = 0

    def count(self, width, heads, mlp, layers_only: bool = False):
        """Parameter count at these widths (ints, or expected widths as tensors); `layers_only`: the attention and
        MLP matrices (with their inner biases) alone."""
        total = 0 if layers_only else width * self.per_channel + self.constant
        for n, m in zip(heads, mlp):
            total = total + 4 * self.head_dim * width * n + 3 * self.head_dim * n + 2 * width * m + m
        return total


_TEXT_TOP_LEVEL = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def _tower_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every open_clip transformer tower of `model` that masks can act on: name -> (module, parameter prefix)."""
    towers = {}
    visual = getattr(model, "visual", None)
    if type(visual).__name__ == "VisionTransformer" and visual.attn_pool is None and visual.pool_type == "tok" \
            and not visual.final_ln_after_pool:
        towers["vision"] = (visual, "visual.")
    text = getattr(model, "text", None)
    if text is not None:
        if type(text).__name__ == "TextTransformer" and text.cls_emb is None and not text.final_ln_after_pool:
            towers["text"] = (text, "text.")
    elif hasattr(model, "token_embedding") and hasattr(model, "transformer"):
        towers["text"] = (model, "")
    return towers


def _tower_norms(tower: nn.Module, prefix: str) -> list[nn.Module]:
    """The tower's LayerNorms; for CLIP's top-level text tower only its own (not the image tower's)."""
    parts = [tower.transformer, tower.ln_final] if prefix == "" else [tower]
    return [m for part in parts for m in part.modules() if isinstance(m, open_clip.transformer.LayerNorm)]


def _tower_parameters(model: nn.Module, name: str, prefix: str) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    if name == "text" and prefix == "":
        return {k: v for k, v in params.items() if k.startswith(_TEXT_TOP_LEVEL)}
    return {k: v for k, v in params.items() if k.startswith(prefix)}


def _blocks(tower: nn.Module) -> nn.ModuleList:
    return tower.transformer.resblocks


def _block_sizes(block: nn.Module) -> tuple[int, int, int]:
    """(heads, head_dim, mlp width) of an open_clip block or a VariableWidthBlock."""
    attn = block.attn
    head_dim = attn.head_dim
    return attn.num_heads, head_dim, block.mlp.c_fc.out_features


def tower_shapes(model: nn.Module) -> list[TowerShape]:
    """The structure of each maskable tower, with `per_channel` and `constant` derived from its actual parameters
    (and checked: the formula at the current widths must give the tower's parameter count)."""
    shapes = []
    for name, (tower, prefix) in _tower_modules(model).items():
        width = tower.transformer.width
        sizes = [_block_sizes(b) for b in _blocks(tower)]
        head_dims = {d for _, d, _ in sizes}
        if len(head_dims) != 1:
            raise UserInputError(f"{name} tower: layers with different head widths {sorted(head_dims)}")
        shape = TowerShape(name, prefix, width, head_dims.pop(), [h for h, _, _ in sizes], [m for _, _, m in sizes])
        params = _tower_parameters(model, name, prefix)
        shape.constant = sum(v.numel() for k, v in params.items() if k.endswith("text_projection.bias"))
        total = sum(v.numel() for v in params.values())
        rest = total - shape.count(width, shape.heads, shape.mlp)
        if rest % width:
            raise UserInputError(f"{name} tower: {rest} parameters outside attention and MLP are not a whole number "
                                 f"of rows per channel (width {width}); cannot prune it")
        shape.per_channel = rest // width
        shapes.append(shape)
    return shapes


def tower_parameter_count(model: nn.Module) -> int:
    """Parameters of the image and text towers (everything but the logit scale and bias)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("logit_"))


def _check_basis(basis: str) -> None:
    if basis not in COUNT_BASES:
        raise UserInputError(f"prune.count={basis!r}: expected one of {', '.join(COUNT_BASES)}")


def counted_parameters(model: nn.Module, basis: str) -> int:
    """The parameters sparsity is measured in (see the module docstring): "all" tower parameters, or the "layers"'
    attention and MLP matrices of every maskable tower."""
    _check_basis(basis)
    if basis == "all":
        return tower_parameter_count(model)
    return int(sum(s.count(s.width, s.heads, s.mlp, layers_only=True) for s in tower_shapes(model)))


# ---------------------------------------------------------------------------------------------------- the masks


def _group_key(tower: str, kind: str, layer: int | None = None) -> str:
    return f"{tower}_{kind}" if layer is None else f"{tower}_{kind}_{layer}"


class L0Masks(nn.Module):
    """The hard-concrete gates of every maskable tower and the Lagrange multipliers of the sparsity constraint.

    Gate groups (`log_alpha` keys): `<tower>_hidden` (width,), `<tower>_heads_<l>` (heads,), `<tower>_mlp_<l>`
    (units,). The multipliers are trained by gradient ascent (`optimizer()` puts them in a `maximize` group).
    """

    def __init__(self, shapes: list[TowerShape], reference_params: int, fixed_params: int, start_sparsity: float,
                 target_sparsity: float, warmup_steps: int, init_log_alpha: float = 3.0, basis: str = "layers"):
        super().__init__()
        self.shapes, self.basis = shapes, basis
        self.reference_params, self.fixed_params = int(reference_params), int(fixed_params)
        self.start_sparsity, self.target_sparsity = float(start_sparsity), float(target_sparsity)
        self.warmup_steps = int(warmup_steps)
        self.log_alpha = nn.ParameterDict()
        for s in shapes:
            self.log_alpha[_group_key(s.name, "hidden")] = nn.Parameter(torch.full((s.width,), init_log_alpha))
            for layer, (n, m) in enumerate(zip(s.heads, s.mlp)):
                self.log_alpha[_group_key(s.name, "heads", layer)] = nn.Parameter(torch.full((n,), init_log_alpha))
                self.log_alpha[_group_key(s.name, "mlp", layer)] = nn.Parameter(torch.full((m,), init_log_alpha))
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))
        self.offset = 0.0  # the common log_alpha offset the last deterministic(target) call needed

    def optimizer(self, lr: float, lambda_lr: float) -> torch.optim.Optimizer:
        """Adam on the gates (descent) and on the multipliers (ascent)."""
        return torch.optim.Adam([{"params": list(self.log_alpha.values()), "lr": lr},
                                 {"params": [self.lambda_1, self.lambda_2], "lr": lambda_lr, "maximize": True}])

    # ---- gates

    def sample(self) -> dict[str, torch.Tensor]:
        """One training draw of every gate (differentiable in log_alpha)."""
        return {k: sample_hard_concrete(v) for k, v in self.log_alpha.items()}

    @torch.no_grad()
    def deterministic(self, target_sparsity: float | None = None) -> dict[str, torch.Tensor]:
        """0/1 gates: in each group the round(expected kept count) gates with the largest log_alpha (at least one).

        With `target_sparsity`, one offset added to every log_alpha is searched so that the gates meet it as
        closely as rounding allows: the learned ranking within and across groups stays, and a constraint that has
        not fully converged by the prune step still yields the asked size (the offset is 0 when it has)."""
        if target_sparsity is None:
            return self._gates_at(0.0)
        wanted = (1 - target_sparsity) * self.reference_params
        low, high = -30.0, 30.0  # params_of grows with the offset
        for _ in range(50):
            mid = (low + high) / 2
            if self.params_of(self._gates_at(mid)) > wanted:
                high = mid
            else:
                low = mid
        best = min((low, high), key=lambda o: abs(self.params_of(self._gates_at(o)) - wanted))
        self.offset = best
        return self._gates_at(best)

    def _gates_at(self, offset: float) -> dict[str, torch.Tensor]:
        gates = {}
        for key, log_alpha in self.log_alpha.items():
            kept = min(len(log_alpha), max(1, round(keep_probability(log_alpha + offset).sum().item())))
            z = torch.zeros_like(log_alpha)
            z[log_alpha.topk(kept).indices] = 1.0
            gates[key] = z
        return gates

    def apply(self, model: nn.Module, gates: dict[str, torch.Tensor] | None) -> None:
        """Set the gates on the model's prunable modules (None removes them: the unmasked model)."""
        for shape in self.shapes:
            tower, prefix = _tower_modules(model)[shape.name]
            hidden = None if gates is None else gates[_group_key(shape.name, "hidden")]
            for module in _tower_norms(tower, prefix):
                module.mask = hidden
            for layer, block in enumerate(_blocks(tower)):
                block.head_mask = None if gates is None else gates[_group_key(shape.name, "heads", layer)]
                block.mlp_mask = None if gates is None else gates[_group_key(shape.name, "mlp", layer)]

    def update(self, optimizer: torch.optim.Optimizer, accelerator=None) -> None:
        """One step of the gates (descent) and multipliers (ascent); gradients averaged over processes first."""
        if accelerator is not None and accelerator.num_processes > 1:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for v in self.log_alpha.values():
                v.clamp_(*_LOG_ALPHA_RANGE)

    # ---- parameter counts and the constraint

    def _count(self, widths: dict[str, torch.Tensor]):
        total = self.fixed_params
        for s in self.shapes:
            heads = [widths[_group_key(s.name, "heads", i)] for i in range(len(s.heads))]
            mlp = [widths[_group_key(s.name, "mlp", i)] for i in range(len(s.mlp))]
            total = total + s.count(widths[_group_key(s.name, "hidden")], heads, mlp,
                                    layers_only=self.basis == "layers")
        return total

    def expected_params(self) -> torch.Tensor:
        """E[counted parameters of both towers] under the gates' distribution (differentiable)."""
        return self._count({k: keep_probability(v).sum() for k, v in self.log_alpha.items()})

    def expected_sparsity(self) -> torch.Tensor:
        return 1 - self.expected_params() / self.reference_params

    def params_of(self, gates: dict[str, torch.Tensor]) -> int:
        """Counted parameters of both towers with these 0/1 gates (what the sliced model will have)."""
        return int(round(float(self._count({k: (v != 0).sum().float() for k, v in gates.items()}))))

    def target_at(self, step: int) -> float:
        """The target sparsity q at `step`: linear from the start value to the target over the warm-up."""
        ramp = 1.0 if self.warmup_steps <= 0 else min(1.0, step / self.warmup_steps)
        return self.start_sparsity + (self.target_sparsity - self.start_sparsity) * ramp

    def lagrangian(self, step: int) -> dict[str, torch.Tensor]:
        """`sparsity_loss` = lambda_1 * (q - p) + lambda_2 * (q - p)^2, and p, q, lambdas for the log."""
        p = self.expected_sparsity()
        q = self.target_at(step)
        gap = q - p
        return {"sparsity_loss": self.lambda_1 * gap + self.lambda_2 * gap * gap,
                "expected_sparsity": p.detach(), "target_sparsity": torch.tensor(q, device=p.device),
                "lambda_1": self.lambda_1.detach().clone(), "lambda_2": self.lambda_2.detach().clone()}


def _prunable_block(block: nn.Module) -> VariableWidthBlock:
    """An open_clip ResidualAttentionBlock as a VariableWidthBlock with the same weights (same names, same math)."""
    if isinstance(block, VariableWidthBlock):
        return block
    if type(block).__name__ != "ResidualAttentionBlock" or hasattr(block, "ln_1_kv") \
            or not isinstance(block.ls_1, nn.Identity) or not isinstance(block.attn, nn.MultiheadAttention):
        raise UserInputError(f"cannot mask a {type(block).__name__} (plain open_clip self-attention blocks only, "
                             "without layer scale)")
    attn = block.attn
    new = VariableWidthBlock(attn.embed_dim, attn.num_heads, attn.embed_dim // attn.num_heads,
                             block.mlp.c_fc.out_features, act_layer=type(block.mlp.gelu), norm_layer=type(block.ln_1))
    new.load_state_dict(block.state_dict())  # strict: every tensor, every shape
    return new.to(device=block.ln_1.weight.device, dtype=block.ln_1.weight.dtype)


def attach_masks(model: nn.Module, reference_params: int | None, start_sparsity: float | None,
                 target_sparsity: float, warmup_steps: int, init_log_alpha: float = 3.0,
                 basis: str = "layers") -> L0Masks:
    """Make `model`'s transformer towers prunable (in place) and return their gates.

    `reference_params`: the original model's counted parameters (sparsity is measured against it; default: this
    model's). `start_sparsity`: q at step 0 (default: this model's sparsity against the reference). `basis`: which
    parameters count, "layers" or "all" (module docstring)."""
    _check_basis(basis)  # before the model is changed
    if not 0 <= target_sparsity < 1:
        raise UserInputError(f"target sparsity {target_sparsity} must be in [0, 1)")
    towers = _tower_modules(model)
    if not towers:
        raise UserInputError("the model has no open_clip transformer tower to prune")
    for tower, prefix in towers.values():
        blocks = _blocks(tower)
        for i in range(len(blocks)):
            blocks[i] = _prunable_block(blocks[i])
        for module in _tower_norms(tower, prefix):
            if type(module) is not open_clip.transformer.LayerNorm and not isinstance(module, MaskedLayerNorm):
                raise UserInputError(f"cannot mask a {type(module).__name__} (open_clip LayerNorm only)")
            module.__class__ = MaskedLayerNorm  # same parameters, a mask-aware forward
    shapes = tower_shapes(model)
    total = counted_parameters(model, basis)
    masked = sum(s.count(s.width, s.heads, s.mlp, layers_only=basis == "layers") for s in shapes)
    reference = reference_params or total
    start = 1 - total / reference if start_sparsity is None else start_sparsity
    if target_sparsity < start - 1e-6:
        raise UserInputError(f"target sparsity {target_sparsity} is below the source's sparsity {start:.3f}")
    return L0Masks(shapes, reference, total - masked, start, target_sparsity, warmup_steps, init_log_alpha, basis)


def source_pruning(spec: str | None) -> dict[str, Any]:
    """What an earlier stage recorded about its pruning (`prune` in its mobiledistill.json), else {}. Records
    written before `count` existed counted every tower parameter: they read as count "all"."""
    if not spec:
        return {}
    parsed = parse_model_spec(spec)
    record = (read_provenance(parsed.name).get("prune") or {}) if parsed.kind == "local-dir" else {}
    return {"count": "all", **record} if record else {}


# ------------------------------------------------------------------------------------------------------ slicing

_BLOCK_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def _slice_tensor(name: str, value: torch.Tensor, hidden: torch.Tensor, heads, mlp, head_dim: int) -> torch.Tensor:
    """Cut one tower tensor (name relative to the tower) to the kept channels, heads and units."""
    match = _BLOCK_RE.match(name)
    if match:
        layer, rest = int(match[1]), match[2]
        head_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads[layer].tolist()])
        inner = value.shape[0] // 3 if rest.startswith("attn.in_proj") else 0
        qkv_rows = torch.cat([head_rows + i * inner for i in range(3)]) if inner else None
        rules = {"ln_1.weight": (hidden,), "ln_1.bias": (hidden,), "ln_2.weight": (hidden,), "ln_2.bias": (hidden,),
                 "attn.in_proj_weight": (qkv_rows, hidden), "attn.in_proj_bias": (qkv_rows,),
                 "attn.out_proj.weight": (hidden, head_rows), "attn.out_proj.bias": (hidden,),
                 "mlp.c_fc.weight": (mlp[layer], hidden), "mlp.c_fc.bias": (mlp[layer],),
                 "mlp.c_proj.weight": (hidden, mlp[layer]), "mlp.c_proj.bias": (hidden,)}
        index = rules.get(rest)
    elif name.startswith("ln_"):  # ln_pre, ln_post, ln_final
        index = (hidden,)
    else:
        rules = {"conv1.weight": (hidden,), "class_embedding": (hidden,), "positional_embedding": (None, hidden),
                 "proj": (hidden,), "token_embedding.weight": (None, hidden), "text_projection": (hidden,),
                 "text_projection.weight": (None, hidden), "text_projection.bias": ()}
        index = rules.get(name)
    if index is None:
        raise UserInputError(f"do not know how to slice {name} {tuple(value.shape)}")
    for dim, keep in enumerate(index):
        if keep is not None:
            value = value.index_select(dim, keep.to(value.device))
    return value


def prune_model(model: nn.Module, model_cfg: dict[str, Any], masks: L0Masks,
                gates: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Slice `model` to the kept channels, heads and MLP units of the 0/1 `gates` (default: the masks'
    deterministic ones at their target sparsity). Returns the smaller model (masks gone), its open_clip config and a
    report (target, achieved and expected sparsity, the log_alpha offset the target needed, the kept widths)."""
    expected = float(masks.expected_sparsity().detach())
    gates = masks.deterministic(masks.target_sparsity) if gates is None else gates
    cfg = copy.deepcopy(model_cfg)
    state = model.state_dict()
    new_state = {k: v for k, v in state.items()}
    layout = {}
    for shape in masks.shapes:
        keep = {k: v.nonzero().flatten().cpu() for k, v in gates.items() if k.startswith(f"{shape.name}_")}
        hidden = keep[_group_key(shape.name, "hidden")]
        heads = [keep[_group_key(shape.name, "heads", i)] for i in range(len(shape.heads))]
        mlp = [keep[_group_key(shape.name, "mlp", i)] for i in range(len(shape.mlp))]
        names = _tower_parameters(model, shape.name, shape.prefix)
        for full_name in names:
            local = full_name[len(shape.prefix):]
            new_state[full_name] = _slice_tensor(local, state[full_name], hidden, heads, mlp, shape.head_dim).clone()
        tower_cfg = cfg["vision_cfg" if shape.name == "vision" else "text_cfg"]
        tower_cfg.update({"width": len(hidden), "head_width": shape.head_dim, "layers": len(heads),
                          "layer_heads": [len(h) for h in heads], "layer_mlp_widths": [len(m) for m in mlp]})
        layout[shape.name] = {"width": len(hidden), "from_width": shape.width,
                              "layer_heads": [len(h) for h in heads], "from_heads": shape.heads,
                              "layer_mlp_widths": [len(m) for m in mlp], "from_mlp_widths": shape.mlp}
    build_cfg = {k: v for k, v in cfg.items() if k != "custom_text"}
    pruned = (open_clip.CustomTextCLIP if hasattr(model, "text") else open_clip.CLIP)(**build_cfg)
    pruned.load_state_dict(new_state)  # strict: every tensor of the new architecture, every shape
    preprocess = getattr(model.visual, "preprocess_cfg", None)
    if preprocess:
        open_clip.model.set_model_preprocess_cfg(pruned, preprocess)
    pruned = pruned.to(next(model.parameters()).device)
    params = counted_parameters(pruned, masks.basis)
    counted = masks.params_of(gates)
    if params != counted:
        raise RuntimeError(f"sliced model has {params} counted parameters, the gates say {counted}")
    report = {"count": masks.basis, "reference_params": masks.reference_params, "params": params,
              "tower_params": tower_parameter_count(pruned),
              "target_sparsity": masks.target_sparsity, "achieved_sparsity": 1 - params / masks.reference_params,
              "expected_sparsity": expected, "log_alpha_offset": masks.offset, "layout": layout}
    return pruned, cfg, report

