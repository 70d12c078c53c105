"""Frozen teachers and teacher ensembles.

A teacher is an open_clip model plus its own preprocessing, tokenizer and logit scale. It is frozen by construction:
no parameter requires grad, it stays in eval mode whatever `.train()` is asked, and it has no state_dict to leak
into a student checkpoint (its weights live in its own model directory).
"""

from collections.abc import Sequence

import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from mdmodels.specs import LoadedModel, ModelSpec, load_model

__all__ = ["Teacher", "TeacherEnsemble", "load_teacher", "load_ensemble"]


class Teacher(nn.Module):
    """A frozen open_clip model that embeds images and texts into its own L2-normalized space."""

    def __init__(self, loaded: LoadedModel):
        super().__init__()
        self.model = loaded.model
        self.model.requires_grad_(False)
        self.preprocess = loaded.preprocess
        self.tokenizer = loaded.tokenizer
        self.spec: ModelSpec = loaded.spec
        self.dim = loaded.embed_dim
        self.logit_scale = loaded.logit_scale
        cfg = loaded.preprocess_cfg
        size = cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.interpolation: str = cfg.get("interpolation", "bicubic")
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        """Teachers never leave eval mode (dropout, batch-norm statistics and masks stay fixed)."""
        return super().train(False)

    def state_dict(self, *args, **kwargs):  # a teacher is never saved into another model's checkpoint
        return {}

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @torch.no_grad()
    def encode_images(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """Embed PIL images with this teacher's own preprocessing. Returns (B, D), L2-normalized."""
        batch = torch.stack([self.preprocess(im) for im in images]).to(self.device)  # (B, 3, H, W)
        return F.normalize(self.model.encode_image(batch).float(), dim=-1)

    @torch.no_grad()
    def encode_image_tensors(self, images: torch.Tensor) -> torch.Tensor:
        """Embed float images in [0, 1] of any size (B, 3, h, w): resize to this teacher's size, then normalize.

        This is how every teacher sees the same augmented view at its own resolution.
        """
        images = images.to(self.device, torch.float32)
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode=self.interpolation, antialias=True,
                                   align_corners=False).clamp_(0, 1)
        images = (images - self.mean) / self.std
        return F.normalize(self.model.encode_image(images).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed texts with this teacher's own tokenizer. Returns (B, D), L2-normalized."""
        tokens = self.tokenizer(list(texts)).to(self.device)  # (B, L)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


class TeacherEnsemble(nn.Module):
    """Several frozen teachers; embeddings are each teacher's normalized embedding, concatenated in order."""

    def __init__(self, teachers: Sequence[Teacher]):
        super().__init__()
        if not teachers:
            raise ValueError("a teacher ensemble needs at least one teacher")
        self.teachers = nn.ModuleList(teachers)

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(False)

    def state_dict(self, *args, **kwargs):
        return {}

    @property
    def dims(self) -> list[int]:
        return [t.dim for t in self.teachers]

    @property
    def logit_scales(self) -> list[float]:
        return [t.logit_scale for t in self.teachers]

    def encode_images(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """(B, sum of D_k): every teacher's normalized embedding of the PIL images, concatenated."""
        return torch.cat([t.encode_images(images).cpu() for t in self.teachers], dim=-1)

    def encode_image_tensors(self, images: torch.Tensor) -> torch.Tensor:
        """(B, sum of D_k) from float images in [0, 1]; each teacher resizes and normalizes them itself."""
        return torch.cat([t.encode_image_tensors(images).cpu() for t in self.teachers], dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, sum of D_k): every teacher's normalized embedding of the texts (each with its own tokenizer)."""
        return torch.cat([t.encode_texts(texts).cpu() for t in self.teachers], dim=-1)

    def split(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Cut concatenated embeddings (..., sum D_k) back into one (..., D_k) tensor per teacher."""
        return list(torch.split(features, self.dims, dim=-1))


def load_teacher(spec: str | ModelSpec, device: str | torch.device = "cpu") -> Teacher:
    return Teacher(load_model(spec, device=device))


def load_ensemble(specs: Sequence[str | ModelSpec], device: str | torch.device = "cpu") -> TeacherEnsemble:
    return TeacherEnsemble([load_teacher(s, device) for s in specs])
