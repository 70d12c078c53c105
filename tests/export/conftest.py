"""Export fixtures: a MobileCLIP FastViT image tower at 64 px (the shared student export is in tests/conftest.py)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fastvit_model_dir(tmp_path_factory) -> Path:
    """MobileCLIP2-S0's image tower (timm fastvit_mci0: MobileOne stem, RepMixer and attention stages) at 64 px,
    with md-student-tiny's text tower: the reparameterization and convolutional int8 paths at test cost."""
    import open_clip
    import torch

    from mdmodels import save_model_dir

    vision = dict(open_clip.get_model_config("MobileCLIP2-S0")["vision_cfg"], image_size=64)
    text = dict(open_clip.get_model_config("md-student-tiny")["text_cfg"], no_causal_mask=True)
    cfg = {"embed_dim": 128, "vision_cfg": vision, "text_cfg": text, "custom_text": True}
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(embed_dim=128, vision_cfg=vision, text_cfg=text)
    tokenizer = open_clip.get_tokenizer("md-student-tiny")
    return save_model_dir(model, cfg, tmp_path_factory.mktemp("fastvit") / "mci0-64", tokenizer=tokenizer)
