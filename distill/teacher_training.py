"""Training or fine-tuning a CLIP or CoCa model on image-text shards.

Offline, no pretrained teacher or captioner can be downloaded, so this is how the embedded default gets them; with
a network it is how a user adapts a pretrained teacher (`ARCH@TAG`) to a domain. Contrastive (CLIP) loss for CLIP
models, CLIP + captioning loss for CoCa (open_clip's `ClipLoss` / `CoCaLoss`), AdamW with cosine decay after a
linear warm-up, gradient clipping, through accelerate (the same code runs on one CPU or under `accelerate launch`).

A pretrained Hugging Face text tower is locked by default (LiT, Zhai et al., 2022): only its projection trains, and
since a locked tower's pooled output never changes, it is computed once per distinct caption and cached.
"""

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mdcore.configs import check_choice, check_range, check_types
from mdcore.errors import UserInputError
from mdcore.processes import make_accelerator
from mdmodels.model_dir import save_model_dir
from mdmodels.specs import LoadedModel, load_model
from reinforced_data.examples import ImageTextSource, TransformExamples
from reinforced_data.pipeline import ExampleStream, StreamTracker, default_num_workers, make_loader
from reinforced_data.shards import resolve_shards

__all__ = ["TeacherTrainConfig", "train_teacher", "cosine_with_warmup", "param_groups_for_weight_decay",
           "optimizer_step", "LockedTextCache", "is_hf_text"]


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
        check_types(self)
        for name in ("steps", "batch_size", "grad_accum_steps", "log_every", "shuffle_buffer"):
            check_range(name, getattr(self, name), 1)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("seed", self.seed, 0, 2**32 - 1)
        check_range("num_workers", self.num_workers, 0, 64)
        check_range("lr", self.lr, 0, low_open=True)
        for name in ("weight_decay", "grad_clip", "clip_loss_weight", "caption_loss_weight"):
            check_range(name, getattr(self, name), 0)
        check_choice("mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's convention: no decay on gains, biases, norms, embeddings' scalars and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def optimizer_step(accelerator, model: nn.Module, optimizer, scheduler, loss: torch.Tensor, grad_clip: float) -> None:
    """Backward, clip (when the accumulated gradients are synchronized), step, schedule, zero: one update."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()  # accelerate's wrapper steps only when the accumulated gradients are synchronized
    if accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class LockedTextCache:
    """Pooled outputs of a locked Hugging Face text tower, computed once per distinct text."""

    def __init__(self, text_tower: nn.Module, tokenizer, device: torch.device):
        self.tower, self.tokenizer, self.device = text_tower, tokenizer, device
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            mode = self.tower.transformer.training
            self.tower.transformer.eval()  # a training loop's .train() would otherwise cache dropout noise
            tokens = self.tokenizer(missing).to(self.device)  # (M, L)
            mask = (tokens != self.tower.config.pad_token_id).long()
            out = self.tower.transformer(input_ids=tokens, attention_mask=mask)
            pooled = self.tower.pooler(out, mask).float().cpu()  # (M, width)
            self.tower.transformer.train(mode)
            self.cache.update(zip(missing, pooled))
        return torch.stack([self.cache[t] for t in texts]).to(self.device)  # (B, width)


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


def _batches(loader, tracker: StreamTracker, urls: list[str]):
    for batch in loader:
        tracker.update(batch)
        if len(batch):
            yield batch
    raise UserInputError(f"no usable samples in {len(urls)} shards ({tracker.skips.summary()})")


def is_hf_text(model: nn.Module) -> bool:
    return type(getattr(model, "text", None)).__name__ == "HFTextEncoder"


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
    from accelerate.utils import set_seed

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
    lock_text = is_hf_text(model) if config.lock_text is None else config.lock_text
    text_cache = None
    if lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
        if is_hf_text(model) and not is_coca:
            text_cache = LockedTextCache(model.text, loaded.tokenizer, accelerator.device)

    trainable = _LiTModel(model) if text_cache is not None else model
    optimizer = torch.optim.AdamW(param_groups_for_weight_decay(model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, config.steps, min(config.warmup_steps, config.steps // 2 or 1)))
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
    batches = _batches(make_loader(stream, workers, config.seed, pin_memory=accelerator.device.type == "cuda"),
                       tracker, urls)

    history: list[dict[str, float]] = []
    start = time.time()
    bar = tqdm(range(config.steps), desc=f"train {model_spec}", disable=not progress or not accelerator.is_main_process,
               dynamic_ncols=True)
    trainable.train()
    for step in bar:
        with accelerator.accumulate(trainable):
            batch = next(batches).to(accelerator.device)
            images, texts = batch.images, batch.captions
            if text_cache is not None:
                out = trainable(images, text_cache(list(texts)))
            else:
                tokens = loaded.tokenizer(list(texts)).to(accelerator.device)
                out = trainable(images, tokens)
            if is_coca:
                losses = loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"],
                                 out["logit_scale"], output_dict=True)
                loss = sum(losses.values())
            else:
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
                losses = {"contrastive_loss": loss}
            if not torch.isfinite(loss):
                raise UserInputError(f"loss is {loss.item()} at step {step} (lower --lr, or check the data)")
            optimizer_step(accelerator, trainable, optimizer, scheduler, loss, config.grad_clip)
        with torch.no_grad():  # open_clip clamps the learned temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        if step % config.log_every == 0 or step == config.steps - 1:
            row = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                   **{k: v.item() for k, v in losses.items()}, "elapsed_s": round(time.time() - start, 2)}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}",
                            img_s=f"{(step + 1) * config.batch_size / (time.time() - start):.0f}")
    wall = time.time() - start
    accelerator.wait_for_everyone()
    summary = {
        "steps": config.steps,
        "samples_seen": config.steps * config.batch_size,
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

