"""Training or fine-tuning a CLIP or CoCa model on image-text shards.

Offline, no pretrained teacher or captioner can be downloaded, so this is how the embedded default gets them; with
a network it is how a user adapts a pretrained teacher (`ARCH@TAG`) to a domain. Contrastive (CLIP) loss for CLIP
models, CLIP + captioning loss for CoCa (open_clip's `ClipLoss` / `CoCaLoss`), AdamW with cosine decay after a
linear warm-up, gradient clipping, through accelerate (the same code runs on one CPU or under `accelerate launch`),
in the training skeleton distillation uses too (`distill.loop`): a step is one update of `grad_accum_steps` batches.

A pretrained Hugging Face text tower is locked by default (LiT, Zhai et al., 2022): only its projection trains, and
since a locked tower's pooled output never changes, it is computed once per distinct caption and cached.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import nn

from distill.loop import (
    LoopConfig,
    check_training_keys,
    lock_text_tower,
    make_optimizer,
    make_schedule,
    train_loop,
    usable_batches,
)
from mdcore.configs import check_range
from mdcore.errors import UserInputError
from mdcore.processes import make_accelerator
from mdcore.recipes import apply_mapping, apply_overrides, read_recipe_file
from mdmodels.model_dir import save_model_dir
from mdmodels.specs import LoadedModel, load_model
from reinforced_data.examples import ImageTextSource, TransformExamples
from reinforced_data.pipeline import ExampleStream, StreamTracker, default_num_workers, make_loader
from reinforced_data.shards import resolve_shards

__all__ = ["TeacherTrainConfig", "load_teacher_recipe", "train_teacher"]


@dataclass
class TeacherTrainConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    lock_text: bool | None = None  # None: lock pretrained Hugging Face text towers, train everything else
    clip_loss_weight: float = 1.0  # CoCa only
    caption_loss_weight: float = 2.0  # CoCa only
    mixed_precision: str = "no"  # accelerate: "no", "fp16", "bf16"
    grad_accum_steps: int = 1
    log_every: int = 25
    shuffle_buffer: int = 2000  # samples held for shuffling, per process (split among its data workers)
    num_workers: int | None = None  # data workers per process (None: the cores per process less one; 0: in-process)

    def __post_init__(self):
        check_training_keys(self)
        for name in ("clip_loss_weight", "caption_loss_weight"):
            check_range(name, getattr(self, name), 0)


def load_teacher_recipe(path: str | Path | None, overrides: list[str] = ()) -> TeacherTrainConfig:
    """The teacher-training recipe at `path` (or the defaults) with `key=value` overrides applied."""
    config = TeacherTrainConfig()
    if path is not None:
        apply_mapping(config, read_recipe_file(path))
    apply_overrides(config, list(overrides))
    config.__post_init__()
    return config


class _LiTModel(nn.Module):
    """A CLIP model whose locked text tower is replaced by cached pooled outputs; only the projection runs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, pooled_text: torch.Tensor) -> dict[str, torch.Tensor]:
        image_features = self.model.encode_image(images, normalize=True)  # (B, D)
        text_features = F.normalize(self.model.text.proj(pooled_text), dim=-1)  # (B, D)
        return {"image_features": image_features, "text_features": text_features,
                "logit_scale": self.model.logit_scale.exp()}


def train_teacher(
    model_spec: str,
    data: str,
    out_dir: str | Path,
    config: TeacherTrainConfig,
    split: str = "train",
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model_spec` (an architecture, or a model to fine-tune) on `data` and write a model directory."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserInputError(f"{out_dir} already exists (delete it or pick another --out)")
    config.__post_init__()  # fields may have been changed since construction
    urls = resolve_shards(data, split)
    accelerator = make_accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.grad_accum_steps)
    set_seed(config.seed)
    loaded: LoadedModel = load_model(model_spec, device=accelerator.device, warn_random=False)
    model = loaded.model
    model.output_dict = True
    is_coca = loaded.is_coca
    lock_text, text_cache = lock_text_tower(model, loaded.tokenizer, accelerator.device, config.lock_text,
                                            cache=not is_coca)
    trainable = _LiTModel(model) if text_cache is not None else model
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_schedule(optimizer, config.steps, config.warmup_steps)
    trainable, optimizer = accelerator.prepare(trainable, optimizer)  # the schedule steps once per update
    world = accelerator.num_processes
    distributed = dict(local_loss=world > 1, gather_with_grad=world > 1, rank=accelerator.process_index,
                       world_size=world)
    if is_coca:
        loss_fn = open_clip.CoCaLoss(caption_loss_weight=config.caption_loss_weight,
                                     clip_loss_weight=config.clip_loss_weight, pad_id=0, **distributed)
    else:
        loss_fn = open_clip.ClipLoss(**distributed)

    per_process_batch = max(1, config.batch_size // world)
    workers = default_num_workers() if config.num_workers is None else config.num_workers
    stream = ExampleStream(urls, ImageTextSource(), TransformExamples(loaded.preprocess_train, config.seed),
                           per_process_batch, config.seed, config.shuffle_buffer, accelerator.process_index, world,
                           workers)
    tracker = StreamTracker(workers)
    loader = make_loader(stream, workers, config.seed, pin_memory=accelerator.device.type == "cuda")
    batches = usable_batches(loader, tracker, f"{len(urls)} shards")

    def losses(batch, step: int) -> dict[str, torch.Tensor]:
        texts = list(batch.captions)
        if text_cache is not None:
            out = trainable(batch.images, text_cache(texts))
        else:
            out = trainable(batch.images, loaded.tokenizer(texts).to(accelerator.device))
        if is_coca:
            return loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"],
                           out["logit_scale"], output_dict=True)
        return {"contrastive_loss": loss_fn(out["image_features"], out["text_features"], out["logit_scale"])}

    start = time.time()
    loop = LoopConfig(config.steps, config.grad_accum_steps, config.grad_clip, config.log_every,
                      samples_per_step=config.batch_size * config.grad_accum_steps)
    history = train_loop(accelerator, trainable, model, optimizer, scheduler, batches, losses, loop,
                         desc=f"train {model_spec}", progress=progress,
                         nan_hint=lambda step: " (lower --lr, or check the data)")
    wall = time.time() - start
    accelerator.wait_for_everyone()
    summary = {
        "steps": config.steps,
        "samples_seen": config.steps * config.batch_size * config.grad_accum_steps,
        "wall_s": round(wall, 1),
        "final_loss": history[-1]["loss"],
        "skips": tracker.skips.as_dict(),
    }
    if accelerator.is_main_process:
        record = dict(provenance or {})
        record.update({"recipe": asdict(config), "init": model_spec, "data": str(data), "split": split,
                       "steps": config.steps, "seed": config.seed, "text_locked": bool(lock_text),
                       "train": summary, "history": history})
        save_model_dir(model, loaded.model_cfg, out_dir, tokenizer=loaded.tokenizer, provenance=record)
    accelerator.wait_for_everyone()
    return summary

