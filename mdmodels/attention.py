"""Self-attention written out as two matrix products and a softmax: the one copy that the variable-width towers
(under ONNX export), the exportable `nn.MultiheadAttention` (`export.towers`) and its XNNPACK form
(`export.phones`) all trace.

Written out rather than `F.scaled_dot_product_attention`, whose exported decomposition rebuilds K's transpose from
dynamic shapes (Shape, Slice, Concat, Reshape) in every layer.
"""

import torch

__all__ = ["additive_mask", "written_out_attention"]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask to add to the scores: boolean masks (`nn.MultiheadAttention`'s rule: True leaves the
    position out) become 0 / -inf, float masks are cast."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def written_out_attention(qkv: torch.Tensor, heads: int, head_dim: int, attn_mask: torch.Tensor | None = None,
                          batched_3d: bool = False) -> torch.Tensor:
    """softmax(Q K^T / sqrt(head_dim) + mask) V per head: (B, L, 3 * H * Dh) packed [q; k; v] projections ->
    (B, L, H * Dh), before the output projection. `attn_mask` is (L, L) or (B * H, L, L).

    The default form (4-D products, one Split of the packed projections) is the short ONNX graph. `batched_3d`
    slices Q, K and V apart and multiplies (B * H, L, Dh) matrices, the form ExecuTorch lowers entirely to
    XNNPACK (it lowers 4-D products and splits through copies outside it)."""
    batch, length = qkv.shape[0], qkv.shape[1]
    inner = heads * head_dim
    mask = additive_mask(attn_mask, qkv.dtype) if attn_mask is not None else None
    if batched_3d:
        q, k, v = qkv[..., :inner], qkv[..., inner:2 * inner], qkv[..., 2 * inner:]  # (B, L, H * Dh) each

        def heads_first(t: torch.Tensor) -> torch.Tensor:  # (B, L, H * Dh) -> (B * H, L, Dh)
            return t.reshape(batch, length, heads, head_dim).transpose(1, 2).reshape(batch * heads, length, head_dim)

        scores = torch.bmm(heads_first(q * head_dim ** -0.5), heads_first(k).transpose(1, 2))  # (B * H, L, L)
        if mask is not None:
            scores = scores + mask  # (L, L) or (B * H, L, L)
        out = torch.bmm(scores.softmax(dim=-1), heads_first(v))  # (B * H, L, Dh)
        return out.reshape(batch, heads, length, head_dim).transpose(1, 2).reshape(batch, length, inner)
    q, k, v = qkv.chunk(3, dim=-1)  # (B, L, H * Dh) each: one Split node
    q = q.reshape(batch, length, heads, head_dim).transpose(1, 2) * head_dim ** -0.5  # (B, H, L, Dh)
    k = k.reshape(batch, length, heads, head_dim).permute(0, 2, 3, 1)  # (B, H, Dh, L)
    v = v.reshape(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, L, Dh)
    scores = q @ k  # (B, H, L, L)
    if mask is not None:
        if mask.dim() == 3:  # (B * H, L, L) -> (B, H, L, L)
            mask = mask.reshape(batch, heads, length, length)
        scores = scores + mask
    out = scores.softmax(dim=-1) @ v  # (B, H, L, Dh)
    return out.transpose(1, 2).reshape(batch, length, inner)  # (B, L, H * Dh)
