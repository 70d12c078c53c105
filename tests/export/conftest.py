"""Export fixtures: small saved models (a shipped student, a MobileCLIP FastViT image tower at 64 px) and one
full export of the student that several tests read."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fastvit_model_dir(tmp_path_factory) -> Path:
    """MobileCLIP2-S0's image tower (timm fastvit_mci0: MobileOne stem, RepMixer and attention stages) at 64 px,
    with md-student-tiny's text tower: the reparameterization and convolutional int8 paths at test cost."""
    import open_clip
    import torch

    from teachers import save_model_dir

    vision = dict(open_clip.get_model_config("MobileCLIP2-S0")["vision_cfg"], image_size=64)
    text = dict(open_clip.get_model_config("md-student-tiny")["text_cfg"], no_causal_mask=True)
    cfg = {"embed_dim": 128, "vision_cfg": vision, "text_cfg": text, "custom_text": True}
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(embed_dim=128, vision_cfg=vision, text_cfg=text)
    tokenizer = open_clip.get_tokenizer("md-student-tiny")
    return save_model_dir(model, cfg, tmp_path_factory.mktemp("fastvit") / "mci0-64", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def student_export(tiny_model_dirs, tmp_path_factory) -> Path:
    """md-student-tiny (saved random weights) exported to ONNX, int8 and CoreML where coremltools imports."""
    from export import ExportConfig, export_model
    from export.coreml import coreml_unavailable_reason

    formats = ("onnx",) if coreml_unavailable_reason() else ("onnx", "coreml")
    out = tmp_path_factory.mktemp("exports") / "student"
    export_model(f"local-dir:{tiny_model_dirs['teacher_b']}", out,
                 ExportConfig(formats=formats, quantize="int8", num_parity_samples=4, progress=False))
    return out
