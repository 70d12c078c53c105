"""Transformer towers whose layers differ in head count and MLP width: what automatic inheritance leaves behind.

open_clip's configs give every layer of a tower the same number of heads and the same MLP width, so a tower sliced
by learned masks (`distill.prune`) cannot be written as a plain config. Its `vision_cfg` / `text_cfg` carry two more
keys, one entry per layer:

    "layer_heads": [3, 2, 3, 1, 2, 3]          heads kept in each layer (each `head_width` wide)
    "layer_mlp_widths": [700, 512, ...]        MLP hidden units kept in each layer

`register_variable_width_towers()` (run by `import teachers`, hence by `import distill`) teaches open_clip's tower
builders those keys: the tower is built as usual (embeddings, norms, pooling, projection) and its blocks are
replaced by `VariableWidthBlock`s with the same parameter names. After that import,
`open_clip.create_model_and_transforms("local-dir:PATH")` loads such a model directory; without it open_clip
rejects the unknown keys.
"""

from collections import OrderedDict

import open_clip
import open_clip.model as open_clip_model
import torch
from torch import nn
from torch.nn import functional as F

from mdmodels.attention import additive_mask, written_out_attention

__all__ = ["VariableWidthAttention", "VariableWidthBlock", "register_variable_width_towers", "VARIABLE_WIDTH_KEYS"]

VARIABLE_WIDTH_KEYS = ("layer_heads", "layer_mlp_widths")


class VariableWidthAttention(nn.Module):
    """Self-attention with `heads` heads of `head_dim` on a `width`-wide residual stream (any of the three may differ
    from the others' usual ratio). Parameter names follow `nn.MultiheadAttention`: packed `in_proj_weight`
    (3 * heads * head_dim, width) as [q; k; v] and `out_proj`. Fused attention in PyTorch; written out as matrix
    products and a softmax under ONNX export, the form that exports to a short graph."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.width, self.num_heads, self.head_dim = width, heads, head_dim
        inner = heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner))
        self.out_proj = nn.Linear(inner, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                head_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3 * H * Dh)
        if torch.onnx.is_in_onnx_export():  # written out: the short ONNX graph
            out = written_out_attention(qkv, heads, head_dim, attn_mask)  # (B, L, H * Dh)
        else:  # fused kernels for training and eager inference, the same math
            q, k, v = (t.reshape(batch, length, heads, head_dim).transpose(1, 2)
                       for t in qkv.chunk(3, dim=-1))  # (B, H, L, Dh) each
            mask = additive_mask(attn_mask, q.dtype) if attn_mask is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, Dh)
            out = out.transpose(1, 2).reshape(batch, length, heads * head_dim)  # (B, L, H * Dh)
        if head_mask is None:
            return self.out_proj(out)
        # learned gates during automatic inheritance, one per head: scaling a head's output is scaling its columns
        # of the output projection, far cheaper than touching the activations
        gates = head_mask.repeat_interleave(head_dim)  # (H * Dh,)
        return F.linear(out, self.out_proj.weight * gates, self.out_proj.bias)


class VariableWidthBlock(nn.Module):
    """open_clip's pre-norm residual block (same parameter names) with its own head count and MLP width.

    `head_mask` and `mlp_mask`, when set (by `distill.prune` while masks are learned), gate each head's output and
    each MLP hidden unit; they are plain attributes, never saved."""

    head_mask: torch.Tensor | None = None
    mlp_mask: torch.Tensor | None = None

    def __init__(self, width: int, heads: int, head_dim: int, mlp_width: int, act_layer=nn.GELU,
                 norm_layer=open_clip.transformer.LayerNorm):
        super().__init__()
        self.ln_1 = norm_layer(width)
        self.attn = VariableWidthAttention(width, heads, head_dim)
        self.ls_1 = nn.Identity()
        self.ln_2 = norm_layer(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", act_layer()),
            ("c_proj", nn.Linear(mlp_width, width)),
        ]))
        self.ls_2 = nn.Identity()

    @property
    def mlp_width(self) -> int:
        return self.mlp.c_fc.out_features

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer.get_cast_dtype asks its first block
        return self.mlp.c_fc.weight.dtype

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = q_x + self.ls_1(self.attn(self.ln_1(q_x), attn_mask=attn_mask, head_mask=self.head_mask))
        if self.mlp_mask is None:
            return x + self.ls_2(self.mlp(self.ln_2(x)))
        hidden = self.mlp.gelu(self.mlp.c_fc(self.ln_2(x)))  # (B, L, M)
        out = F.linear(hidden, self.mlp.c_proj.weight * self.mlp_mask, self.mlp.c_proj.bias)  # gates on the columns
        return x + self.ls_2(out)


def _with_variable_blocks(build, tower_kind: str):
    """Wrap one of open_clip's tower builders so that configs with `layer_heads` get variable-width blocks.

    Both towers' variable configs give the head width as `head_width` (the text config usually names a head count
    instead; there `head_width` is ours and is taken out before open_clip sees the config)."""

    def build_tower(embed_dim, cfg, quick_gelu: bool = False, cast_dtype: torch.dtype | None = None):
        if not isinstance(cfg, dict) or not any(k in cfg for k in VARIABLE_WIDTH_KEYS):
            return build(embed_dim, cfg, quick_gelu, cast_dtype)
        cfg = dict(cfg)
        heads, mlp_widths = cfg.pop("layer_heads"), cfg.pop("layer_mlp_widths")
        if not len(heads) == len(mlp_widths) == cfg.get("layers"):
            raise ValueError(f"layer_heads and layer_mlp_widths need one entry per layer ({cfg.get('layers')})")
        width = cfg["width"]
        if tower_kind == "vision":
            head_dim = cfg["head_width"]
            cfg["head_width"] = width  # one full-width head: a valid placeholder, the blocks are replaced below
        else:
            head_dim = cfg.pop("head_width")
            cfg["heads"] = 1
        tower = build(embed_dim, cfg, quick_gelu, cast_dtype)
        act_layer = open_clip.transformer.QuickGELU if quick_gelu else nn.GELU
        norm_layer = type(tower.transformer.resblocks[0].ln_1)
        tower.transformer.resblocks = nn.ModuleList(
            VariableWidthBlock(width, h, head_dim, m, act_layer, norm_layer) for h, m in zip(heads, mlp_widths))
        return tower

    build_tower.wrapped = build
    return build_tower


def register_variable_width_towers() -> None:
    """Teach open_clip's tower builders the `layer_heads` / `layer_mlp_widths` keys (idempotent)."""
    if hasattr(open_clip_model._build_vision_tower, "wrapped"):
        return
    open_clip_model._build_vision_tower = _with_variable_blocks(open_clip_model._build_vision_tower, "vision")
    open_clip_model._build_text_tower = _with_variable_blocks(open_clip_model._build_text_tower, "text")
