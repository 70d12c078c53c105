"""The two towers of a CLIP model as separate modules, each the exact graph an app runs.

    ImageEncoder   image (B, 3, H, W) float32, normalized as preprocess.json says -> embedding (B, D), L2-normalized
    TextEncoder    text (B, L) int32 token ids                                   -> embedding (B, D), L2-normalized

Token ids are int32 because phone runtimes (CoreML, NNAPI, many ONNX mobile builds) have no int64 inputs; the model
still indexes its embedding table with int64 inside the graph. `prepare_for_export` folds MobileOne / FastViT
branches first (timm's `reparameterize_model`), so the exported graph is the fast inference-time network.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ImageEncoder", "TextEncoder", "PreparedModel", "prepare_for_export", "IMAGE_INPUT", "TEXT_INPUT",
           "IMAGE_OUTPUT", "TEXT_OUTPUT"]

IMAGE_INPUT, TEXT_INPUT = "image", "text"
# Not "embedding": the exporter already names the text tower's token-embedding value that way.
IMAGE_OUTPUT, TEXT_OUTPUT = "image_embedding", "text_embedding"


class ImageEncoder(nn.Module):
    """The image tower with L2-normalized output.

    With `mean` and `std` the module normalizes its input itself and takes RGB in [0, 1]: CoreML's image inputs
    scale by one scalar only, so per-channel CLIP normalization has to live inside the graph.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.model = model
        self.normalize_input = mean is not None
        if self.normalize_input:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.normalize_input:
            image = (image - self.mean) / self.std  # (B, 3, H, W)
        return F.normalize(self.model.encode_image(image), dim=-1)  # (B, D)


class TextEncoder(nn.Module):
    """The text tower with L2-normalized output; takes int32 token ids (B, context_length)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(text.long()), dim=-1)  # (B, D)


@dataclass
class PreparedModel:
    model: nn.Module  # eval mode, reparameterized
    reparameterized: list[str]  # names of the modules whose branches were folded


def prepare_for_export(model: nn.Module) -> PreparedModel:
    """Eval mode and MobileOne / FastViT reparameterization (timm), on a copy; the caller's model is untouched."""
    from timm.utils.model import reparameterize_model

    model = model.eval()
    folded = [name for name, module in model.named_modules() if name and hasattr(module, "reparameterize")]
    model = reparameterize_model(model, inplace=False).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return PreparedModel(model, folded)
