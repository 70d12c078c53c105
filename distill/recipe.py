"""Recipes: a training run is a YAML file plus `key=value` overrides, resolved into a `DistillConfig`.

Unknown keys are errors (a typo must not silently fall back to a default). The resolved recipe is written into the
run directory, so a run can be repeated from what it wrote.
"""

import copy
from dataclasses import dataclass, field
from pathlib import Path

from distill.loop import check_training_keys
from mdcore.configs import check_choice, check_range
from mdcore.errors import UserInputError
from mdcore.recipes import apply_mapping, apply_overrides, read_recipe_file, set_key
from reinforced_data.examples import CaptionChoice

__all__ = ["LossWeights", "PruneConfig", "DistillConfig", "load_recipe", "apply_overrides", "stage_config",
           "validate_recipe"]


@dataclass
class LossWeights:
    """MobileCLIP's total: w_clip * (CLIP_real + CLIP_syn) + w_kd * (KD_real + KD_syn), plus optional terms."""

    w_clip: float = 0.0
    w_kd: float = 1.0
    w_affinity: float = 0.0  # TinyCLIP affinity mimicking against the reference teacher
    affinity_logit_scale: float = 50.0
    # CLIP-KD feature distillation against the reference teacher. Its MSE is averaged over embedding dimensions, so
    # it is ~1e-3 per unit weight: useful weights are in the thousands (CLIP-KD-style runs use 2000-4000).
    w_feature: float = 0.0
    reference_teacher: int = 0  # which stored teacher (0-based) the affinity and feature terms follow
    use_synthetic: bool = True  # add the *_syn terms when the dataset has synthetic captions


@dataclass
class PruneConfig:
    """Automatic inheritance (`distill.prune`): learned masks on a copy of `student_from`, then slicing."""

    target_sparsity: float = 0.0  # fraction of the original model's counted parameters removed (0: no masks)
    count: str = "layers"  # what counts: "layers" (attention + MLP matrices, what compute follows) or "all"
    start_sparsity: float | None = None  # q at the stage's first step (default: the source's own sparsity)
    warmup: float = 0.5  # fraction of the masked steps over which q rises linearly to the target
    prune_at: float = 0.67  # fraction of the stage's steps after which the model is sliced (the rest fine-tunes)
    mask_lr: float = 0.2  # Adam on the gates' log_alpha
    lambda_lr: float = 0.3  # Adam ascent on the Lagrange multipliers (fast: stages here are a few hundred steps)
    init_log_alpha: float = 3.0  # gates start open (P(z != 0) = 0.99)


@dataclass
class DistillConfig:
    student: str = "md-student-tiny"
    inherit_from: str | None = None
    lock_text: bool | None = None  # None: lock a pretrained Hugging Face text tower (LiT), train everything else
    student_from: str | None = None  # start the student as a copy of this model (teacher or an earlier stage)
    online_teachers: list[str] = field(default_factory=list)  # run these teachers in the loop instead of stored ones
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    mixed_precision: str = "no"  # "no", "fp16", "bf16" (accelerate)
    seed: int = 0
    aug_sampling: str = "random"  # "random" or "sequential" (augmentation epoch % K)
    eval_every: int = 0  # steps between zero-shot evaluations on eval_split (0: only at the end)
    eval_data: str | None = None  # dataset root for evaluation
    eval_split: str = "test"
    save_every: int = 0
    log_every: int = 10
    shuffle_buffer: int = 2000  # samples held for shuffling, per process (split among its data workers)
    num_workers: int | None = None  # data workers per process (None: the cores per process less one; 0: in-process)
    loss: LossWeights = field(default_factory=LossWeights)
    captions: CaptionChoice = field(default_factory=CaptionChoice)  # which synthetic captions, how (MobileCLIP2)
    prune: PruneConfig = field(default_factory=PruneConfig)
    stages: list[dict] = field(default_factory=list)  # progressive runs: each entry overrides keys for one stage


def validate_recipe(config: DistillConfig) -> DistillConfig:
    """Every key's type (from the annotations) and range, checked before a run starts; returns `config`."""
    check_training_keys(config)
    for name in ("eval_every", "save_every"):
        check_range(name, getattr(config, name), 0)
    check_choice("aug_sampling", config.aug_sampling, ("random", "sequential"))
    loss = config.loss
    for name in ("w_clip", "w_kd", "w_affinity", "w_feature"):
        check_range(f"loss.{name}", getattr(loss, name), 0)
    check_range("loss.affinity_logit_scale", loss.affinity_logit_scale, 0, low_open=True)
    check_range("loss.reference_teacher", loss.reference_teacher, 0)
    config.captions.validate()
    prune = config.prune
    check_range("prune.target_sparsity", prune.target_sparsity, 0, 0.99)
    check_range("prune.start_sparsity", prune.start_sparsity, 0, 0.99)
    check_choice("prune.count", prune.count, ("layers", "all"))
    check_range("prune.warmup", prune.warmup, 0, 1)
    check_range("prune.prune_at", prune.prune_at, 0, 1, low_open=True)
    check_range("prune.mask_lr", prune.mask_lr, 0, low_open=True)
    check_range("prune.lambda_lr", prune.lambda_lr, 0, low_open=True)
    check_range("prune.init_log_alpha", prune.init_log_alpha, -20, 20)
    return config


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> DistillConfig:
    """The recipe at `path` (or the defaults) with `overrides` applied."""
    config = DistillConfig()
    if path is not None:
        apply_mapping(config, read_recipe_file(path))
    config = apply_overrides(config, list(overrides))
    validate_recipe(config)
    for index in range(len(config.stages)):  # a typo in a stage fails now, not hours later
        validate_recipe(stage_config(config, index))
    return config


def stage_config(config: DistillConfig, index: int) -> DistillConfig:
    """The config of stage `index`: the recipe's keys with that stage's entries on top (and no stages)."""
    stage = config.stages[index]
    if not isinstance(stage, dict):
        raise UserInputError(f"stage {index} must be a mapping of recipe keys, got {stage!r}")
    resolved = copy.deepcopy(config)
    resolved.stages = []
    for key, value in stage.items():
        if key == "stages":
            raise UserInputError("a stage cannot hold stages")
        set_key(resolved, key, value)
    return resolved
