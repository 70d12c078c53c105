import open_clip
import pytest
import torch

import mdmodels  # noqa: F401  (registers the shipped architectures)
from distill.inherit import inherit_weights, layer_map
from mdcore.errors import UserInputError


def test_layer_map_is_evenly_spaced():
    assert layer_map(12, 4) == [0, 3, 6, 9]
    assert layer_map(6, 4) == [0, 1, 3, 4]
    assert layer_map(4, 4) == [0, 1, 2, 3]
    with pytest.raises(UserInputError):
        layer_map(3, 4)


def test_inherits_depth_width_and_whole_heads():
    torch.manual_seed(0)
    teacher = open_clip.create_model("md-teacher-s")  # vision 6 x 192 (3 heads), text 4 x 192 (3 heads)
    student = open_clip.create_model("md-student-tiny")  # vision 4 x 128 (2 heads), text 3 x 128 (2 heads)
    report = inherit_weights(student, teacher)
    assert report.layer_maps == {"vision": [0, 1, 3, 4], "text": [0, 1, 2]}
    assert report.count("init") == 0 and report.count("sliced") > 0
    t, s = teacher.state_dict(), student.state_dict()
    # student vision layer 2 is teacher layer 3; q, k, v each keep the first 128 rows (two 64-wide heads)
    src = t["visual.transformer.resblocks.3.attn.in_proj_weight"]
    dst = s["visual.transformer.resblocks.2.attn.in_proj_weight"]
    for block in range(3):
        assert torch.equal(dst[block * 128:(block + 1) * 128], src[block * 192:block * 192 + 128, :128])
    assert torch.equal(s["visual.conv1.weight"], t["visual.conv1.weight"][:128])
    assert torch.equal(s["token_embedding.weight"], t["token_embedding.weight"][:, :128])
    assert torch.equal(s["text_projection"], t["text_projection"][:128, :128])
    assert torch.equal(s["logit_scale"], t["logit_scale"])
    assert "vision" in report.table() and "2<-3" in report.table()


def test_sliced_attention_equals_the_teachers_heads():
    """Keeping whole heads: the student's attention output equals the teacher's first heads' contribution."""
    torch.manual_seed(0)
    teacher = open_clip.create_model("md-teacher-s")
    student = open_clip.create_model("md-student-tiny")
    inherit_weights(student, teacher)
    t_attn = teacher.visual.transformer.resblocks[0].attn
    s_attn = student.visual.transformer.resblocks[0].attn
    x = torch.randn(5, 2, 192)
    x[..., 128:] = 0  # the student only sees the first 128 channels
    with torch.no_grad():
        t_out_proj = t_attn.out_proj.weight.clone()
        t_attn.out_proj.weight[:, 128:] = 0  # drop the third head's output
        t_attn.out_proj.bias.zero_()
        s_attn.out_proj.bias.zero_()
        t_attn.in_proj_bias.zero_()
        s_attn.in_proj_bias.zero_()
        # without biases the first two heads of the teacher see exactly the student's input
        t_y = t_attn(x, x, x, need_weights=False)[0][..., :128]
        s_y = s_attn(x[..., :128], x[..., :128], x[..., :128], need_weights=False)[0]
        t_attn.out_proj.weight.copy_(t_out_proj)
    assert torch.allclose(t_y, s_y, atol=1e-5)


def test_other_tower_kinds_are_left_at_init_and_reported():
    teacher = open_clip.create_model("ViT-B-32")
    student = open_clip.create_model("MobileCLIP2-S0")  # FastViT image tower, 12 x 512 text tower
    report = inherit_weights(student, teacher)
    assert "TimmModel" in report.towers_left_at_init["vision"] and report.layer_maps["text"] == list(range(12))
    assert report.count("inherited") > 0
    with pytest.raises(UserInputError, match="teacher only 4"):
        inherit_weights(student, open_clip.create_model("md-teacher-s"))  # a deeper student than its teacher
    student = open_clip.create_model("md-student-tiny")
    hf_teacher = open_clip.create_model("md-teacher-m", pretrained_text=False)
    report = inherit_weights(student, hf_teacher)
    assert "text" in report.towers_left_at_init and "HFTextEncoder" in report.towers_left_at_init["text"]
    assert report.layer_maps["vision"] == [0, 2, 4, 6]


def test_mismatched_head_width_is_refused():
    teacher = open_clip.create_model("md-teacher-s")
    cfg = open_clip.get_model_config("md-student-tiny")
    cfg["vision_cfg"]["head_width"] = 32
    student = open_clip.model.CLIP(**cfg)
    with pytest.raises(UserInputError, match="head width"):
        inherit_weights(student, teacher)


def test_a_shared_hugging_face_text_tower_is_inherited_whole():
    """md-student-minilm and md-teacher-m use the same all-MiniLM-L6-v2 tower: it is copied whole, projection
    included, while the ViT image tower is sliced as usual."""
    torch.manual_seed(0)
    teacher = open_clip.create_model("md-teacher-m")
    with torch.no_grad():
        teacher.text.proj.weight.normal_()
        teacher.text.transformer.encoder.layer[0].output.dense.bias.add_(1.0)
    student = open_clip.create_model("md-student-minilm")
    report = inherit_weights(student, teacher)
    assert "text" not in report.towers_left_at_init
    t, s = teacher.state_dict(), student.state_dict()
    text_keys = [k for k in s if k.startswith("text.")]
    assert text_keys and all(torch.equal(s[k], t[k]) for k in text_keys)
    assert report.layer_maps["vision"] == [0, 2, 4, 6]
    assert torch.equal(s["visual.conv1.weight"], t["visual.conv1.weight"][:128])


def test_another_hugging_face_text_tower_is_left_at_init():
    torch.manual_seed(0)
    teacher = open_clip.create_model("md-teacher-m")
    cfg = {k: v for k, v in open_clip.get_model_config("md-student-minilm").items() if k != "custom_text"}
    student = open_clip.CustomTextCLIP(**{**cfg, "embed_dim": 128})  # another projection width: not the same tower
    before = {k: v.clone() for k, v in student.state_dict().items() if k.startswith("text.")}
    report = inherit_weights(student, teacher)
    assert "text" in report.towers_left_at_init
    assert all(torch.equal(student.state_dict()[k], v) for k, v in before.items())
