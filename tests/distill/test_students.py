"""Every shipped student builds, runs forward and backward, and has the parameter counts of its paper."""

import open_clip
import pytest
import torch

import mdmodels  # noqa: F401  (registers the shipped architectures)
from mdmodels.registry import SHIPPED_ARCHITECTURES

STUDENTS = [a for a in SHIPPED_ARCHITECTURES if a.startswith(("TinyCLIP-", "md-student"))]

# (image tower, text tower without its token embedding) in millions, from the TinyCLIP (Wu et al., 2023),
# MobileCLIP (Vasu et al., 2024) and MobileCLIP2 (Faghri et al., 2025) tables.
PAPER_PARAMS = {
    "TinyCLIP-ViT-8M-16-Text-3M": (8, 3),
    "TinyCLIP-ViT-39M-16-Text-19M": (39, 19),
    "TinyCLIP-ViT-40M-32-Text-19M": (40, 19),
    "TinyCLIP-ViT-61M-32-Text-29M": (61, 29),
    "MobileCLIP-S1": (21.5, None),
    "MobileCLIP-S2": (35.7, None),
    "MobileCLIP-B": (86.3, None),
    "MobileCLIP2-S0": (11.4, None),
}


def _params(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize("arch", STUDENTS)
def test_every_shipped_student_runs_forward_and_backward(arch):
    torch.manual_seed(0)
    model = open_clip.create_model(arch)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    tokens = open_clip.get_tokenizer(arch)(["an emoji of a cat.", "a red circle."])
    image_features, text_features, logit_scale = model(torch.randn(2, 3, size, size), tokens)[:3]
    assert image_features.shape == text_features.shape == (2, open_clip.get_model_config(arch)["embed_dim"])
    loss = open_clip.ClipLoss()(image_features, text_features, logit_scale)
    loss.backward()
    assert all(p.grad is not None for p in model.visual.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_papers(arch):
    model = open_clip.create_model(arch)
    image_m, text_m = PAPER_PARAMS[arch]
    assert _params(model.visual) == pytest.approx(image_m, rel=0.04, abs=0.3)
    if text_m is not None:
        text = sum(p.numel() for n, p in model.named_parameters()
                   if not n.startswith("visual") and n not in ("token_embedding.weight", "logit_scale")) / 1e6
        assert text == pytest.approx(text_m, rel=0.05, abs=0.5)  # the papers round to whole millions
