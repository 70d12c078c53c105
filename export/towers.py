"""The two towers of a CLIP model as separate modules, each the exact graph an app runs.

    ImageEncoder   image (B, 3, H, W) float32, normalized as preprocess.json says -> embedding (B, D), L2-normalized
    TextEncoder    text (B, L) int32 token ids                                   -> embedding (B, D), L2-normalized

Token ids are int32 because phone runtimes (CoreML, NNAPI, many ONNX mobile builds) have no int64 inputs; the model
still indexes its embedding table with int64 inside the graph. `prepare_for_export` folds MobileOne / FastViT
branches first (timm's `reparameterize_model`), so the exported graph is the fast inference-time network.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.utils.model import reparameterize_model
from torch import nn

from mdmodels.attention import written_out_attention

__all__ = ["ImageEncoder", "TextEncoder", "ExportableSelfAttention", "PreparedModel", "prepare_for_export",
           "unit_layer_scales",
           "IMAGE_INPUT", "TEXT_INPUT", "IMAGE_OUTPUT", "TEXT_OUTPUT"]

IMAGE_INPUT, TEXT_INPUT = "image", "text"
# Not "embedding": the exporter already names the text tower's token-embedding value that way.
IMAGE_OUTPUT, TEXT_OUTPUT = "image_embedding", "text_embedding"


class ImageEncoder(nn.Module):
    """The image tower with L2-normalized output.

    With `mean` and `std` the module normalizes its input itself and takes RGB in [0, 1]: CoreML's image inputs
    scale by one scalar only, so per-channel CLIP normalization has to live inside the graph. With `pixels` as well
    it takes camera pixels, uint8 RGB (B, H, W, 3), and the scale to [0, 1] joins the normalization.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 pixels: bool = False):
        super().__init__()
        self.model = model
        self.normalize_input = mean is not None
        self.pixels = pixels
        if pixels and not self.normalize_input:
            raise ValueError("a pixel input needs the mean and std to normalize with")
        if self.normalize_input:
            scale = 255.0 if pixels else 1.0  # (x / 255 - mean) / std == (x - 255 mean) / (255 std)
            self.register_buffer("mean", scale * torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
                                 persistent=False)
            self.register_buffer("std", scale * torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                                 persistent=False)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """The embedding before its L2 normalization, (B, D)."""
        if self.pixels:
            image = image.permute(0, 3, 1, 2).to(torch.float32)  # (B, H, W, 3) uint8 -> (B, 3, H, W)
        if self.normalize_input:
            image = (image - self.mean) / self.std  # (B, 3, H, W)
        return self.model.encode_image(image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(image), dim=-1)  # (B, D)


class TextEncoder(nn.Module):
    """The text tower with L2-normalized output; takes int32 token ids (B, context_length)."""

    def __init__(self, model: nn.Module, int32_ids: bool = False):
        super().__init__()
        self.model = model
        self.int32_ids = int32_ids  # LiteRT: the end-of-text argmax converts on int32 ids only

    def embed(self, text: torch.Tensor) -> torch.Tensor:
        """The embedding before its L2 normalization, (B, D)."""
        return self.model.encode_text(text if self.int32_ids else text.long())

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(text), dim=-1)  # (B, D)


class ExportableSelfAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` whose self-attention traces to a short graph: one packed QKV projection, head
    reshapes, two matrix products and a softmax.

    PyTorch's generic `multi_head_attention_forward` traces to about 40 small ONNX nodes per layer (sequence-first
    transposes, per-projection views, dynamic-shape arithmetic); at phone-sized widths their per-node cost outweighs
    the matrix products, and no onnxruntime fusion recognizes the pattern. Same parameters, same math; anything
    but plain batch-first self-attention (cross-attention, key padding masks, returned weights) takes the parent's
    path.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        plain = (key is query and value is query and self.batch_first and self._qkv_same_embed_dim
                 and key_padding_mask is None and not need_weights and not is_causal and self.bias_k is None
                 and not self.add_zero_attn and (self.dropout == 0.0 or not self.training))
        if not plain:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3 * E)
        return self.out_proj(self.attend(qkv, attn_mask)), None

    def attend(self, qkv: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, L, 3 * E) packed projections -> (B, L, E) attention output, before the output projection."""
        return written_out_attention(qkv, self.num_heads, qkv.shape[2] // 3 // self.num_heads, attn_mask)


@dataclass
class PreparedModel:
    model: nn.Module  # eval mode, reparameterized, attention in its exportable form
    reparameterized: list[str]  # names of the modules whose branches were folded
    attention_rewritten: int = 0  # self-attention layers given the short graph (ExportableSelfAttention)


def prepare_for_export(model: nn.Module) -> PreparedModel:
    """Eval mode, MobileOne / FastViT reparameterization (timm) and exportable self-attention, on a copy; the
    caller's model is untouched. Every export is still checked against the caller's original model."""
    folded = [name for name, module in model.named_modules() if name and hasattr(module, "reparameterize")]
    model = reparameterize_model(copy.deepcopy(model).eval(), inplace=True)  # folding reads the BN statistics
    rewritten = 0
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = ExportableSelfAttention  # same parameters and buffers, another forward
            rewritten += 1
    for p in model.parameters():
        p.requires_grad_(False)
    return PreparedModel(model, folded, rewritten)


def unit_layer_scales(model: nn.Module) -> int:
    """Set every layer scale (timm's LayerScale / LayerScale2d and FastViT's own, a `gamma` parameter) to 1, in
    place; returns how many. For random-weight benchmarks only: timm starts them at 1e-5, which makes a random
    FastViT tower embed every image alike, so that no parity check on it could fail."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            gamma = getattr(module, "gamma", None)
            if "LayerScale" in type(module).__name__ and isinstance(gamma, nn.Parameter):
                gamma.fill_(1.0)
                count += 1
    return count
