"""The training skeleton that teacher training (`distill.teacher_training`) and distillation (`distill.train`)
share: AdamW over timm's weight-decay groups (open_clip's convention), open_clip's cosine schedule after a linear
warm-up, the Hugging Face text-tower lock, the checks of the keys their configs share, and one loop.

The loop is nanoGPT's, through accelerate: each step takes `grad_accum_steps` batches from the input pipeline,
asks the trainer for its named loss terms, backs the sum of the `*_loss` terms up, clips and steps once the
gradients are synchronized, clamps the learned temperature as open_clip does, and logs the global batch's values.
A trainer supplies only what differs: its terms, and hooks after an update, at a log row and at the end of a step.
"""

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from open_clip_train.scheduler import cosine_lr
from timm.optim import param_groups_weight_decay
from torch import nn
from tqdm import tqdm

from mdcore.configs import check_choice, check_range, check_types
from mdcore.errors import UserInputError

__all__ = ["CosineSchedule", "make_optimizer", "make_schedule", "optimizer_step",
           "LockedTextCache", "is_hf_text", "lock_text_tower", "usable_batches", "check_training_keys", "LoopConfig",
           "train_loop"]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, extra: Iterable[nn.Module] = ()
                   ) -> torch.optim.AdamW:
    """AdamW with CLIP's betas and epsilon over `model`'s decay groups; `extra` modules (a projection) undecayed."""
    groups = param_groups_weight_decay(model, weight_decay)  # timm's: no decay on 1-D gains, biases, the logit scale
    for module in extra:
        groups.append({"params": list(module.parameters()), "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


class CosineSchedule:
    """open_clip's training schedule (`open_clip_train.scheduler.cosine_lr`: a linear warm-up from lr/warmup to lr,
    then a cosine to 0 at `steps`) with the state a checkpoint keeps: the updates taken (`last_epoch`, as torch's
    schedulers name it). Every param group of `optimizer` follows it."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int):
        self.steps = steps
        # (a 1-step run warms up for its one step; open_clip's cosine would then divide by steps - warmup = 0)
        self.adjust = cosine_lr(optimizer, optimizer.param_groups[0]["lr"], warmup_steps, max(steps, warmup_steps + 1))
        self.last_epoch = 0
        self.last_lr = self.adjust(0)

    def step(self) -> None:
        self.last_epoch += 1
        self.last_lr = self.adjust(min(self.last_epoch, self.steps))  # past the end the cosine would climb again

    def get_last_lr(self) -> list[float]:
        return [self.last_lr]

    def state_dict(self) -> dict[str, int]:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.last_lr = self.adjust(min(self.last_epoch, self.steps))


def make_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int) -> CosineSchedule:
    """The schedule over `steps` updates, its warm-up at most half of them; stepped once per update by
    `optimizer_step` (accelerate's wrapper would step it once per process)."""
    return CosineSchedule(optimizer, steps, min(warmup_steps, max(1, steps // 2)))


def optimizer_step(accelerator, model: nn.Module, optimizer, scheduler, loss: torch.Tensor, grad_clip: float) -> None:
    """Backward, clip (when the accumulated gradients are synchronized), step, schedule, zero: one update."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()  # accelerate's wrapper steps only when the accumulated gradients are synchronized
    if accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def is_hf_text(model: nn.Module) -> bool:
    return type(getattr(model, "text", None)).__name__ == "HFTextEncoder"


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


def lock_text_tower(model: nn.Module, tokenizer, device: torch.device, lock: bool | None, cache: bool = True
                    ) -> tuple[bool, LockedTextCache | None]:
    """Lock the text tower (LiT, Zhai et al., 2022) when `lock` says so, or by default when it is a pretrained
    Hugging Face tower; only its projection trains. A locked Hugging Face tower's pooled output never changes, so
    it is computed once per distinct text (the cache, unless `cache` is off). Returns (locked, cache)."""
    locked = is_hf_text(model) if lock is None else lock
    if not locked:
        return False, None
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    return True, (LockedTextCache(model.text, tokenizer, device) if cache and is_hf_text(model) else None)


def usable_batches(loader: Iterable, tracker, what: str) -> Iterator:
    """The loader's batches, each noted by `tracker` (worker positions, skips, bytes); a worker's last, empty
    report is noted and passed over. Running dry means no shard held a usable sample: a `UserInputError`."""
    for batch in loader:
        tracker.update(batch)
        if len(batch):
            yield batch
    raise UserInputError(f"no usable samples in {what} ({tracker.skips.summary()})")


def check_training_keys(config: Any) -> None:
    """Type and range of the keys every trainer's config shares (teacher training's, distillation's): the loop's,
    the optimizer's, the schedule's and the data pipeline's; a `UserInputError` names the first one out of range."""
    check_types(config)
    for name in ("steps", "batch_size", "grad_accum_steps", "log_every", "shuffle_buffer"):
        check_range(name, getattr(config, name), 1)
    check_range("warmup_steps", config.warmup_steps, 0)
    check_range("seed", config.seed, 0, 2**32 - 1)
    check_range("num_workers", config.num_workers, 0, 64)
    check_range("lr", config.lr, 0, low_open=True)
    check_range("weight_decay", config.weight_decay, 0)
    check_range("grad_clip", config.grad_clip, 0)
    check_choice("mixed_precision", config.mixed_precision, ("no", "fp16", "bf16"))


@dataclass
class LoopConfig:
    steps: int
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    log_every: int = 25
    samples_per_step: int = 0  # for the progress bar's samples/s (the global batch times the accumulation)


def train_loop(accelerator, module: nn.Module, model: nn.Module, optimizer, scheduler, batches: Iterator,
               losses: Callable[[Any, int], dict[str, torch.Tensor]], config: LoopConfig, *, start_step: int = 0,
               rows: list[dict[str, Any]] | None = None, desc: str = "train", progress: bool = True,
               nan_hint: Callable[[int], str] = lambda step: "", log_also: Callable[[int], bool] = lambda done: False,
               after_update: Callable[[], None] | None = None,
               on_log: Callable[[dict[str, Any], int], None] | None = None,
               end_of_step: Callable[[int, list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Run steps `start_step` .. `config.steps - 1`; returns the log rows (`rows`, the resumed run's, extended).

    `module` is what accelerate prepared (its forward runs inside `losses`), `model` the open_clip model inside it
    (its logit scale is clamped). `losses(batch, step)` gives named terms for a batch already on the device: keys
    ending in `_loss` are summed into the objective, the others only logged. Logged values are the global batch's
    (the mean over processes, in one all-reduce). A step is logged every `log_every` steps, at the last, and when
    `log_also(done)`; `on_log(row, done)` may add to the row, `after_update()` runs after each synchronized update,
    `end_of_step(done, rows)` after every step (checkpoints)."""
    rows = [] if rows is None else rows
    start = time.time()
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc=desc,
               disable=not progress or not accelerator.is_main_process, dynamic_ncols=True)
    module.train()
    for step in bar:
        for _ in range(config.grad_accum_steps):
            with accelerator.accumulate(module):
                terms = losses(next(batches).to(accelerator.device), step)
                loss = sum(v for k, v in terms.items() if k.endswith("_loss"))
                means = accelerator.reduce(torch.stack([v.detach().float() for v in terms.values()]), reduction="mean")
                terms = dict(zip(terms, means))
                global_loss = sum(v for k, v in terms.items() if k.endswith("_loss"))
                if not torch.isfinite(global_loss):
                    raise UserInputError(f"loss is {global_loss.item()} at step {step}{nan_hint(step)}")
                optimizer_step(accelerator, module, optimizer, scheduler, loss, config.grad_clip)
                if after_update is not None and accelerator.sync_gradients:
                    after_update()
        with torch.no_grad():  # open_clip clamps the learned temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        done = step + 1
        if step % config.log_every == 0 or done == config.steps or log_also(done):
            row = {"step": step, "loss": global_loss.item(), "lr": scheduler.get_last_lr()[0],
                   **{k: v.item() for k, v in terms.items()}, "elapsed_s": round(time.time() - start, 2)}
            if on_log is not None:
                on_log(row, done)
            rows.append(row)
            accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
            postfix = {"loss": f"{row['loss']:.3f}"}
            if config.samples_per_step:
                postfix["img_s"] = f"{(done - start_step) * config.samples_per_step / (time.time() - start):.0f}"
            bar.set_postfix(postfix)
        if end_of_step is not None:
            end_of_step(done, rows)
    return rows
