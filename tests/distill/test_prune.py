import json
import os
from pathlib import Path

import open_clip
import pytest
import torch

import mdmodels  # noqa: F401  (registers the shipped architectures and the variable-width towers)
from distill.prune import (
    attach_masks,
    counted_parameters,
    keep_probability,
    prune_model,
    sample_hard_concrete,
    tower_parameter_count,
    tower_shapes,
)
from distill.recipe import load_recipe
from distill.train import distill
from mdcore.errors import UserInputError
from mdmodels.model_dir import save_model_dir
from mdmodels.specs import load_model
from mobiledistill.stages import run_stages

REPO = Path(__file__).parents[2]


def _randomize_gates(masks, seed: int = 0, spread: float = 3.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in masks.log_alpha.values():
            v.copy_(torch.randn(v.shape, generator=generator) * spread)


def test_gate_samples_follow_the_hard_concrete_distribution():
    torch.manual_seed(0)
    log_alpha = torch.tensor([-4.0, -1.0, 0.0, 1.0, 4.0]).repeat(40_000, 1)  # (N, 5)
    z = sample_hard_concrete(log_alpha)
    assert z.min() == 0 and z.max() == 1  # stretched and clamped: exact zeros and ones occur
    empirical = (z > 0).float().mean(dim=0)
    assert torch.allclose(empirical, keep_probability(log_alpha[0]), atol=0.01)
    assert keep_probability(torch.tensor(5.0)) > 0.99  # the gates start open


def test_parameter_formula_counts_every_tower_parameter():
    for arch in ("md-teacher-s", "md-student-tiny"):
        model = open_clip.create_model(arch)
        shapes = tower_shapes(model)
        assert {s.name for s in shapes} == {"vision", "text"}
        counted = sum(s.count(s.width, s.heads, s.mlp) for s in shapes)
        assert counted == tower_parameter_count(model) == sum(p.numel() for p in model.parameters()) - 1
        # the "layers" basis: the attention and MLP matrices (with their inner biases), counted independently here
        inner = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "mlp.c_fc.weight",
                 "mlp.c_fc.bias", "mlp.c_proj.weight")
        layers = sum(p.numel() for n, p in model.named_parameters() if ".resblocks." in n and n.endswith(inner))
        assert counted_parameters(model, "layers") == layers < counted_parameters(model, "all") / 2
        assert attach_masks(model, None, None, 0.3, 10).reference_params == layers
    hf = open_clip.create_model("md-teacher-m", pretrained_text=False)  # BERT text tower: not maskable, counted fixed
    masks = attach_masks(hf, None, None, 0.3, 10, basis="all")
    assert [s.name for s in masks.shapes] == ["vision"]
    assert masks.fixed_params == sum(p.numel() for n, p in hf.named_parameters() if n.startswith("text."))
    assert attach_masks(hf, None, None, 0.3, 10).fixed_params == 0  # "layers": only the maskable towers count
    with pytest.raises(UserInputError, match="prune.count"):
        attach_masks(hf, None, None, 0.3, 10, basis="flops")


@pytest.mark.parametrize("basis", ["layers", "all"])
def test_expected_sparsity_matches_sampled_masks(basis):
    torch.manual_seed(0)
    model = open_clip.create_model("md-student-tiny")
    masks = attach_masks(model, None, None, 0.5, 10, basis=basis)
    assert masks.expected_sparsity().item() == pytest.approx(0.0, abs=0.02)  # open gates: about the whole model
    _randomize_gates(masks)
    with torch.no_grad():
        sampled = [masks.params_of(masks.sample()) for _ in range(600)]
    empirical = 1 - sum(sampled) / len(sampled) / masks.reference_params
    assert 0.2 < masks.expected_sparsity().item() < 0.8
    assert empirical == pytest.approx(masks.expected_sparsity().item(), abs=0.01)
    deterministic = 1 - masks.params_of(masks.deterministic()) / masks.reference_params
    assert deterministic == pytest.approx(masks.expected_sparsity().item(), abs=0.05)
    for target in (0.3, 0.5, 0.7):  # a common log_alpha offset meets any target, keeping the learned ranking
        met = 1 - masks.params_of(masks.deterministic(target)) / masks.reference_params
        assert met == pytest.approx(target, abs=0.005)


def test_penalty_sign_gradients_and_ascent_on_the_multipliers():
    model = open_clip.create_model("md-student-tiny")
    masks = attach_masks(model, None, None, 0.6, warmup_steps=10)
    assert masks.target_at(0) == 0.0 and masks.target_at(5) == pytest.approx(0.3) and masks.target_at(50) == 0.6
    with torch.no_grad():
        masks.lambda_1.fill_(1.0)
        masks.lambda_2.fill_(1.0)
    terms = masks.lagrangian(step=10)
    gap = 0.6 - terms["expected_sparsity"].item()
    assert gap > 0 and terms["sparsity_loss"].item() == pytest.approx(gap + gap ** 2, rel=1e-5)
    terms["sparsity_loss"].backward()
    assert masks.lambda_1.grad.item() == pytest.approx(gap, rel=1e-5)  # d/d lambda_1 = q - p
    assert masks.lambda_2.grad.item() == pytest.approx(gap ** 2, rel=1e-5)
    assert all((v.grad > 0).all() for v in masks.log_alpha.values())  # descent closes gates: sparsity goes up
    before = {k: v.detach().clone() for k, v in masks.log_alpha.items()}
    masks.update(masks.optimizer(lr=0.1, lambda_lr=0.1))
    assert masks.lambda_1.item() > 1.0 and masks.lambda_2.item() > 1.0  # ascent
    assert all((masks.log_alpha[k] < before[k]).all() for k in before)
    # above the target the first multiplier's gradient turns negative
    with torch.no_grad():
        for v in masks.log_alpha.values():
            v.fill_(-10.0)
    masks.lagrangian(step=10)["sparsity_loss"].backward()
    assert masks.lambda_1.grad.item() < 0


@pytest.mark.parametrize("arch", ["md-teacher-s", "md-student-tiny"])
def test_sliced_model_equals_masked_model_and_loads_with_open_clip(arch, tmp_path):
    torch.manual_seed(0)
    loaded = load_model(arch, warn_random=False)
    model = loaded.model.eval()
    images = torch.randn(3, 3, 64, 64)
    texts = loaded.tokenizer(["a red circle.", "a blue square with a long caption", "x"])
    with torch.no_grad():
        reference = model.encode_image(images), model.encode_text(texts)
    masks = attach_masks(model, None, None, 0.5, 10)
    with torch.no_grad():  # prunable blocks and mask-aware norms compute what open_clip's did
        assert torch.allclose(model.encode_image(images), reference[0], atol=1e-5)
        assert torch.allclose(model.encode_text(texts), reference[1], atol=1e-5)
    _randomize_gates(masks, spread=2.0)
    gates = masks.deterministic()
    masks.apply(model, gates)
    with torch.no_grad():
        masked = model.encode_image(images), model.encode_text(texts)
    pruned, cfg, report = prune_model(model, loaded.model_cfg, masks, gates)
    pruned.eval()
    with torch.no_grad():
        assert torch.allclose(pruned.encode_image(images), masked[0], atol=1e-5)
        assert torch.allclose(pruned.encode_text(texts), masked[1], atol=1e-5)
    assert report["params"] == counted_parameters(pruned, "layers") < counted_parameters(model, "layers")
    assert report["tower_params"] == tower_parameter_count(pruned) < tower_parameter_count(model)
    assert report["achieved_sparsity"] == pytest.approx(1 - report["params"] / report["reference_params"])
    vision = cfg["vision_cfg"]
    assert vision["width"] < 192 if arch == "md-teacher-s" else vision["width"] <= 128
    assert len(set(vision["layer_heads"])) > 1 or len(set(vision["layer_mlp_widths"])) > 1  # per-layer widths
    assert pruned.visual.conv1.weight.shape[0] == vision["width"]  # channels removed, not zeroed

    out = save_model_dir(pruned, cfg, tmp_path / "pruned", tokenizer=loaded.tokenizer)
    again, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")  # plain open_clip
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again.encode_image(images), masked[0], atol=1e-5)
        assert torch.allclose(again.encode_text(texts), masked[1], atol=1e-5)
    assert load_model(str(out)).model_cfg["vision_cfg"]["layer_heads"] == vision["layer_heads"]
    if arch == "md-student-tiny":  # export works on it and checks the ONNX towers against eager PyTorch
        from export.exporter import ExportConfig, export_model

        report = export_model(str(out), tmp_path / "export", ExportConfig(formats=("onnx",), progress=False))
        assert report["files"]["image_encoder.onnx"]["min_cosine"] > 0.9999
        assert report["files"]["text_encoder.onnx"]["min_cosine"] > 0.9999


def test_masks_refuse_what_they_cannot_prune():
    model = open_clip.create_model("md-student-tiny")
    with pytest.raises(UserInputError, match="target sparsity"):
        attach_masks(model, None, None, 1.5, 10)
    with pytest.raises(UserInputError, match="no open_clip transformer"):
        attach_masks(torch.nn.Linear(2, 2), None, None, 0.5, 10)
    masks = attach_masks(open_clip.create_model("RN50"), None, None, 0.5, 10, basis="all")  # a ResNet stays whole
    assert [s.name for s in masks.shapes] == ["text"] and masks.fixed_params > 0


def test_two_stage_run_prunes_progressively_and_resumes(one_teacher_reinforced, tiny_model_dirs, tmp_path):
    reinforced = one_teacher_reinforced
    source = tiny_model_dirs["teacher_b"]  # md-student-tiny weights: small enough for a test
    config = load_recipe(REPO / "recipes" / "emoji-auto-inherit.yaml",
                         ["steps=4", "batch_size=8", "warmup_steps=1", "log_every=1", f"student_from={source}",
                          "prune.prune_at=0.5", "prune.mask_lr=2.0", "prune.lambda_lr=2.0",
                          "stages=[{prune: {target_sparsity: 0.2}}, {prune: {target_sparsity: 0.4}}]"])
    run = tmp_path / "run"
    summary = run_stages(str(reinforced), run, config, progress=False)
    for stage in ("stage-0", "stage-1"):
        assert (run / stage / "masked" / "open_clip_config.json").is_file()
        assert (run / stage / "open_clip_config.json").is_file()
        rows = [json.loads(x) for x in (run / stage / "masked" / "log.jsonl").read_text().splitlines()]
        assert {"sparsity_loss", "expected_sparsity", "target_sparsity", "lambda_1"} <= set(rows[0])
    records = summary["stages"]
    reference = counted_parameters(open_clip.create_model_and_transforms(f"local-dir:{source}")[0], "layers")
    assert [r["target_sparsity"] for r in records] == [0.2, 0.4]
    assert all(r["reference_params"] == reference for r in records)  # stage 1 counts against the first source
    assert reference > records[0]["params"] > records[1]["params"]
    assert summary["steps"] == 8 and summary["evaluation"]["num_samples"] > 0
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run}")  # the last stage, as open_clip loads it
    assert counted_parameters(model, "layers") == records[1]["params"]
    provenance = json.loads((run / "mobiledistill.json").read_text())
    assert len(provenance["stages"]) == 2 and provenance["prune"]["params"] == records[1]["params"]

    with pytest.raises(UserInputError, match="finished run"):
        run_stages(str(reinforced), run, config, progress=False)
    # an interrupted second stage: the first is reused as it is, the second runs again
    stamp = os.path.getmtime(run / "stage-0" / "open_clip_model.safetensors")
    (run / "open_clip_config.json").unlink()
    (run / "stage-1" / "open_clip_config.json").unlink()
    with pytest.raises(UserInputError, match="--resume"):
        run_stages(str(reinforced), run, config, progress=False)
    again = run_stages(str(reinforced), run, config, resume=True, progress=False)
    assert os.path.getmtime(run / "stage-0" / "open_clip_model.safetensors") == stamp
    assert again["stages"][1]["params"] == records[1]["params"]
    other = load_recipe(None, ["steps=4", f"student_from={source}", "prune.target_sparsity=0.3"])
    (run / "open_clip_config.json").unlink()
    with pytest.raises(UserInputError, match="another recipe"):
        run_stages(str(reinforced), run, other, resume=True, progress=False)
    mixed = load_recipe(None, ["steps=2", f"student_from={run / 'stage-0'}", "prune.target_sparsity=0.5",
                               "prune.count=all"])  # stage-0 counted "layers": one basis per chain of stages
    with pytest.raises(UserInputError, match="prune.count"):
        distill(str(reinforced), tmp_path / "mixed", mixed, progress=False)
