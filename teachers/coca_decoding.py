"""Key-value-cached decoding for open_clip's CoCa models, on the models' own modules and weights.

open_clip's `CoCa.generate` runs the whole prefix through the text tower and the multimodal decoder for every new
token, and projects every position onto the vocabulary. Here each step feeds one token per row: the self-attention
keys and values of earlier positions are kept (text tower and multimodal decoder alike), the cross-attention keys
and values over the image tokens are computed once per image, and only the new position is projected. Norms, MLPs,
layer scales and projections are the model's own modules, called as they are; attention is recomputed from each
`nn.MultiheadAttention`'s own `in_proj_weight` / `out_proj` (no weight is copied), so any open_clip CoCa
(`coca_ViT-B-32`, `coca_ViT-L-14`, `md-coca-tiny`, ...) decodes unchanged.

The text tower's key mask follows open_clip's: with the legacy CLS mask of existing CoCa weights the key at
position k is masked when the token at k - 1 is the pad id (0, which is also a real token), with the corrected one
when the token at k is; causal attention makes that mask cacheable.

At one row per step the decoders are matrix-vector products, bound by reading each weight once per token, and the
step is a few hundred small operators. `CachedCoCa.compiled(device)` gives the same step at one fixed shape (the
position a tensor, attention over the whole cache with the later positions masked) through `torch.compile`: its
operators fuse, and on a CPU a one-row linear layer becomes a fused multiply-and-sum loop that streams its weight
two to three times as fast as a one-row BLAS call (inductor's decompose_mm pass; bench/matvec.py). Compiled CPU
kernels depend on the intra-op thread count, so there is one compiled step per device type and thread count.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CachedCoCa", "DecodeState"]

# Always: no guard on the model's modules (a step never changes them; the state's tensors are still guarded).
# On a CPU also inductor's pass that turns one-row matrix products into fused multiply-and-sum reductions, and its
# C++ wrapper, which runs the graph without Python between kernels and without the GIL, so that threads decoding
# groups beside each other (`Captioner.generate`) do run in parallel.
_GUARDS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
_CPU_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}, "cpp_wrapper": True}


@dataclass
class DecodeState:
    """The caches of N rows decoding together, each tower's layers stacked: keys and values
    (layers, N, heads, max_len, head_dim)."""

    text_keys: torch.Tensor
    text_values: torch.Tensor
    decoder_keys: torch.Tensor
    decoder_values: torch.Tensor
    cross_keys: torch.Tensor  # (decoder layers, N, heads, image tokens, head_dim), computed once per image
    cross_values: torch.Tensor
    text_valid: torch.Tensor  # (N, max_len) bool: which text-tower keys may be attended to
    previous: torch.Tensor  # (N,) the token fed at the last step (the legacy mask looks one token back)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, W) -> (N, heads, L, W / heads)"""
    n, length, width = x.shape
    return x.view(n, length, heads, width // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(N, heads, L, d) -> (N, L, heads * d)"""
    n, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * d)


class CachedCoCa:
    """Steps an open_clip CoCa model one token at a time with key-value caches (see the module docstring)."""

    def __init__(self, model: nn.Module):
        text, decoder = model.text, model.text_decoder
        self.model, self.text, self.decoder = model, text, decoder
        self.text_blocks = list(text.transformer.resblocks)
        self.decoder_blocks = list(zip(decoder.resblocks, decoder.cross_attn))
        for block in self.text_blocks + [b for pair in self.decoder_blocks for b in pair]:
            if not block.attn._qkv_same_embed_dim:
                raise ValueError("cached decoding needs attention with one packed input projection")
        self.legacy_mask = text.cls_emb is not None and not getattr(text, "correct_cls_mask", False)
        self.pad_id = getattr(text, "pad_id", 0)
        self._compiled: dict[tuple[str, int], Callable] = {}

    @torch.no_grad()
    def start(self, image_embs: torch.Tensor, rows_per_image: int, max_len: int) -> DecodeState:
        """Caches for `rows_per_image` rows per image of `image_embs` (G, T, W) (the image tokens CoCa's visual
        tower returns), with the cross-attention keys and values computed once per image."""
        n = image_embs.shape[0] * rows_per_image
        device, dtype = image_embs.device, image_embs.dtype

        def empty(blocks) -> torch.Tensor:
            attn = blocks[0].attn
            return torch.zeros(len(blocks), n, attn.num_heads, max_len, attn.embed_dim // attn.num_heads,
                               device=device, dtype=dtype)

        cross_keys, cross_values = [], []
        for _, block in self.decoder_blocks:
            memory = block.ln_1_kv(image_embs)  # (G, T, W)
            width = block.attn.embed_dim
            weight, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
            keys = F.linear(memory, weight[width:2 * width], bias[width:2 * width] if bias is not None else None)
            values = F.linear(memory, weight[2 * width:], bias[2 * width:] if bias is not None else None)
            cross_keys.append(_heads(keys, block.attn.num_heads).repeat_interleave(rows_per_image, dim=0))
            cross_values.append(_heads(values, block.attn.num_heads).repeat_interleave(rows_per_image, dim=0))
        text_blocks, decoder_blocks = self.text_blocks, [b for b, _ in self.decoder_blocks]
        return DecodeState(empty(text_blocks), empty(text_blocks), empty(decoder_blocks), empty(decoder_blocks),
                           torch.stack(cross_keys), torch.stack(cross_values),
                           torch.zeros(n, max_len, dtype=torch.bool, device=device),
                           torch.full((n,), -1, dtype=torch.long, device=device))

    @staticmethod
    def _self_attention(block, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        position: int | torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One residual block's self-attention for the new position, its key and value added to the cache
        (N, heads, max_len, d). At an int position the attention reads the cache up to it; at a tensor position
        (1,) it reads the whole cache, `mask` (N or 1, 1, 1, max_len) hiding the later positions."""
        attn = block.attn
        q, k, v = (_heads(t, attn.num_heads) for t in F.linear(block.ln_1(x), attn.in_proj_weight,
                                                               attn.in_proj_bias).chunk(3, dim=-1))
        if isinstance(position, int):
            keys[:, :, position] = k[:, :, 0]
            values[:, :, position] = v[:, :, 0]
            keys, values = keys[:, :, :position + 1], values[:, :, :position + 1]
            mask = mask[..., :position + 1] if mask is not None else None
        else:
            keys.index_copy_(2, position, k)
            values.index_copy_(2, position, v)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (N, heads, 1, d)
        return x + block.ls_1(attn.out_proj(_merge(out)))

    @staticmethod
    def _cross_attention(block, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        width = attn.embed_dim
        bias = attn.in_proj_bias[:width] if attn.in_proj_bias is not None else None
        q = _heads(F.linear(block.ln_1(x), attn.in_proj_weight[:width], bias), attn.num_heads)  # (N, heads, 1, d)
        out = F.scaled_dot_product_attention(q, keys, values)  # (N, heads, 1, d)
        return x + block.ls_1(attn.out_proj(_merge(out)))

    @torch.no_grad()
    def step(self, state: DecodeState, tokens: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
        """Feed `tokens` (N,) at `position` (an int, or a long tensor (1,) for the fixed-shape step); returns the
        logits (N, vocabulary) of the token after it."""
        text = self.text
        looked_at = state.previous if self.legacy_mask else tokens
        now = looked_at != self.pad_id
        if self.legacy_mask:
            now = now | (position == 0)
        if isinstance(position, int):  # the attention reads the cache up to `position`: no causal mask needed
            embedded = text.positional_embedding[position]
            state.text_valid[:, position] = now
            text_mask, decoder_mask = state.text_valid[:, None, None], None  # (N, 1, 1, max_len)
        else:  # one shape for every position: the later ones are masked
            embedded = text.positional_embedding.index_select(0, position)
            state.text_valid.index_copy_(1, position, now[:, None])
            causal = torch.arange(state.text_valid.shape[1], device=tokens.device) <= position  # (max_len,)
            text_mask, decoder_mask = (state.text_valid & causal)[:, None, None], causal[None, None, None]
        state.previous.copy_(tokens)
        x = (text.token_embedding(tokens)[:, None] + embedded).to(state.text_keys.dtype)  # (N, 1, W)
        for i, block in enumerate(self.text_blocks):
            x = self._self_attention(block, x, state.text_keys[i], state.text_values[i], position, text_mask)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        if text.cls_emb is None:  # CoCa's CLS variant hands its tokens on without the final norm
            x = text.ln_final(x)
        for i, (block, cross) in enumerate(self.decoder_blocks):
            x = self._self_attention(block, x, state.decoder_keys[i], state.decoder_values[i], position,
                                     decoder_mask)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            x = self._cross_attention(cross, x, state.cross_keys[i], state.cross_values[i])
            x = x + cross.ls_2(cross.mlp(cross.ln_2(x)))
        x = self.decoder.ln_final(x[:, 0])  # (N, W)
        if self.decoder.text_projection is not None:
            x = x @ self.decoder.text_projection
        return x.float()  # (N, V)

    def compiled(self, device: torch.device) -> Callable[[DecodeState, torch.Tensor, torch.Tensor], torch.Tensor]:
        """`step` compiled for `device` and, on a CPU, the current intra-op thread count, to be called with a
        tensor position (1,). The first call at a new shape compiles (seconds to a minute); later calls at that
        shape reuse it."""
        key = (torch.device(device).type, torch.get_num_threads())
        if key not in self._compiled:
            options = {**_GUARDS, **(_CPU_OPTIONS if key[0] == "cpu" else {})}
            self._compiled[key] = torch.compile(self.step, dynamic=False, options=options)
        return self._compiled[key]
