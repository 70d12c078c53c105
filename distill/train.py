"""Distilling a student from a reinforced dataset: build, loop, log, checkpoint (accelerate underneath).

Each step takes, per sample, one stored augmentation (random, or epoch % K), replays it at the student's
resolution, and uses that view's stored teacher embeddings; the real caption and one random synthetic caption come
with their stored text embeddings. Teachers cost nothing here. With `online_teachers` the teachers instead embed
the same views and captions in the loop (open_clip / TinyCLIP style; plain image-text shards work too, with a
fresh augmentation per epoch), for comparison. The losses are in `distill.losses`; their weights in the recipe
(`distill.recipe`).

The loop is the one teacher training uses too (`distill.loop`). The batches come from the input pipeline
(`reinforced_data.pipeline`): for a given seed, process count and worker count they are the same on every run,
and `--resume` reloads the last checkpoint (`distill.checkpoint`) with where every data worker stood, so it goes
on with the batches the uninterrupted run would have seen. The losses contrast each process's rows against the
gathered global batch.
"""

import json
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from accelerate.utils import gather_object, set_seed
from torch import nn

from distill.checkpoint import (
    STEP_NAME,
    TrainingState,
    checkpoint_step,
    last_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from distill.curves import save_curves
from distill.evaluate import evaluate_model
from distill.inherit import inherit_weights
from distill.loop import (
    LockedTextCache,
    LoopConfig,
    lock_text_tower,
    make_optimizer,
    make_schedule,
    train_loop,
    usable_batches,
)
from distill.losses import affinity_mimicking_loss, clip_loss, ensemble_kd_loss, feature_distillation_loss
from distill.prune import attach_masks, counted_parameters, prune_model, source_pruning, tower_parameter_count
from distill.recipe import DistillConfig, validate_recipe
from mdcore.atomic import write_text_atomic
from mdcore.errors import UserInputError
from mdcore.jsonio import read_jsonl_file
from mdcore.locks import hold_directory, holds_nothing, remove_temporaries
from mdcore.names import CHECKPOINTS
from mdcore.processes import make_accelerator, process_state
from mdmodels.model_dir import CONFIG_NAME, is_model_dir, read_provenance, write_model_files
from mdmodels.specs import load_model
from reinforced_data.augment import AugmentationConfig
from reinforced_data.examples import DistillExamples, ImageTextSource, ReinforcedSource
from reinforced_data.pipeline import Batch, ExampleStream, StreamTracker, default_num_workers, make_loader
from reinforced_data.reader import pair_image_shards, read_info, reinforced_records
from reinforced_data.shards import SkipLog, iter_raw_samples, resolve_shards
from teachers.teacher import load_ensemble

__all__ = ["distill", "compute_losses", "StudentStep"]


def _plain_image_text_shards(data: str | Path) -> list[str] | None:
    """The shards of `data` when it is plain image-text data (no stored embeddings), else None."""
    root = Path(str(data))
    if root.is_dir() and ((root / "config.json").is_file() or (root / "reinforce_run.json").is_file()):
        return None
    try:
        urls = resolve_shards(data, split="train")
    except UserInputError:
        return None  # read_info reports what is wrong
    first = next(iter_raw_samples(urls[:1]), {})
    return None if "npz" in first or "pth.gz" in first else urls


@torch.no_grad()
def _online_teacher_embeddings(ensemble, views: torch.Tensor, real, syn):
    """What a reinforced dataset would have stored, computed now: (B, sum D) image, real and synthetic text."""
    t_image = ensemble.encode_image_tensors(views)  # each teacher resizes and normalizes the view its own way
    t_real = ensemble.encode_texts(list(real))
    t_syn = ensemble.encode_texts(list(syn)) if all(syn) else torch.zeros_like(t_real)
    return t_image, t_real, t_syn


class StudentStep(nn.Module):
    """All of the student that trains, in one forward: the normalized image and text features of a batch, the
    logit scale and, for feature distillation, the projected features. Called through the module accelerate
    prepared, so under several processes DDP averages every gradient, and mixed precision covers all of it.

    With a locked Hugging Face text tower (`locked_cache`), its cached pooled outputs go through the trainable
    projection only."""

    def __init__(self, model: nn.Module, tokenizer, locked_cache: LockedTextCache | None = None,
                 projection: nn.Module | None = None):
        super().__init__()
        self.model, self.projection = model, projection
        self.tokenizer, self.locked_cache = tokenizer, locked_cache

    def forward(self, images: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
        image = self.model.encode_image(images, normalize=True)  # (B, D)
        if self.locked_cache is not None:
            text = F.normalize(self.model.text.proj(self.locked_cache(texts)), dim=-1)  # (T, D)
        else:
            text = self.model.encode_text(self.tokenizer(texts).to(images.device), normalize=True)  # (T, D)
        out = {"image": image, "text": text, "logit_scale": self.model.logit_scale.exp()}
        if self.projection is not None:  # student dim -> the reference teacher's
            out["projected_image"] = F.normalize(self.projection(image), dim=-1)
            out["projected_text"] = F.normalize(self.projection(text), dim=-1)
        return out


def compute_losses(student: nn.Module, batch: Batch, config: DistillConfig, dims: list[int],
                   teacher_scales: list[float]) -> dict[str, torch.Tensor]:
    """Named loss terms of one batch (on the student's device; the teachers' embeddings in `batch.image_emb`,
    `text_emb`, `syn_emb`); keys ending in `_loss` are summed into the objective. `student` is a `StudentStep`
    (or the module accelerate made of it)."""
    real, syn = batch.captions, batch.syn_captions
    w = config.loss
    use_syn = w.use_synthetic and all(syn)
    out = student(batch.images, list(real) + (list(syn) if use_syn else []))
    image_features, scale = out["image"], out["logit_scale"]  # (B, D)
    real_features, syn_features = out["text"][:len(real)], out["text"][len(real):]  # (B, D) each
    t_image, t_real, t_syn = (t.float().split(dims, dim=-1) for t in (batch.image_emb, batch.text_emb, batch.syn_emb))
    terms: dict[str, torch.Tensor] = {}
    pairs = [("real", real_features, t_real)] + ([("syn", syn_features, t_syn)] if use_syn else [])
    for name, features, teacher_text in pairs:
        if w.w_clip:
            terms[f"clip_{name}_loss"] = w.w_clip * clip_loss(image_features, features, scale)
        if w.w_kd:
            terms[f"kd_{name}_loss"] = w.w_kd * ensemble_kd_loss(image_features, features, scale, list(t_image),
                                                                 list(teacher_text), teacher_scales)
    ref = w.reference_teacher
    if w.w_affinity:
        terms["affinity_loss"] = w.w_affinity * affinity_mimicking_loss(
            image_features, real_features, t_image[ref], t_real[ref], logit_scale=w.affinity_logit_scale)
    if w.w_feature:
        image_projected = out.get("projected_image", image_features)
        text_projected = out.get("projected_text", out["text"])[:len(real)]
        terms["feature_loss"] = w.w_feature * (feature_distillation_loss(image_projected, t_image[ref])
                                               + feature_distillation_loss(text_projected, t_real[ref])) / 2
    terms["logit_scale"] = scale.detach()
    return terms


def _resume_point(run_dir: Path, steps: int) -> Path | None:
    """The checkpoint `--resume` continues from (None: start afresh), or a `UserInputError` when it cannot: a
    finished run is continued only to more steps, and only from the checkpoint of its last step."""
    checkpoint = last_checkpoint(run_dir)
    saved = checkpoint_step(checkpoint) if checkpoint is not None else 0
    if saved > steps:
        raise UserInputError(f"{run_dir}'s last checkpoint is at step {saved}, beyond --steps {steps}")
    if not is_model_dir(run_dir):
        return checkpoint
    finished = _finished_steps(run_dir)
    if finished is None or steps <= finished:
        raise UserInputError(f"{run_dir} holds a finished run of {finished} steps (give more --steps to continue it, "
                             "delete it, or pick another --out)")
    if checkpoint is None or saved != finished:
        raise UserInputError(f"{run_dir} holds a finished run of {finished} steps without a checkpoint of its last "
                             "step to continue from (runs save one with --save-every)")
    return checkpoint


def _finished_steps(run_dir: Path) -> int | None:
    steps = read_provenance(run_dir).get("steps")
    return steps if type(steps) is int else None


def _logged_rows(log_path: Path, start_step: int) -> list[dict[str, Any]]:
    """The log rows of the steps before `start_step` (a torn last line, from a kill mid-write, is dropped)."""
    if not log_path.is_file():
        return []
    rows = []
    for row in read_jsonl_file(log_path):
        if type(row.get("step")) is not int:
            raise UserInputError(f"{log_path} has a row without an integer step")
        if row["step"] < start_step:
            rows.append(row)
    return rows


def _write_log(log_path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(log_path, "".join(json.dumps(r) + "\n" for r in rows))


def distill(data: str, run_dir: str | Path, config: DistillConfig, images: str | None = None, resume: bool = False,
            progress: bool = True, command: str = "") -> dict[str, Any]:
    """Train `config.student` on the reinforced dataset `data`; writes the run directory and returns a summary.

    The run directory is held for the run (`mdcore.locks`): a second run on it is refused, and what a killed run
    left half-written there (temporaries, a checkpoint without its step.json) is removed when a run takes it over."""
    run_dir = Path(run_dir)
    validate_recipe(config)  # a library caller's config gets the checks a recipe gets
    if is_model_dir(run_dir) and not resume:
        raise UserInputError(f"{run_dir} holds a finished run (delete it, pick another --out, or continue it with "
                             "--resume and more --steps)")
    if not holds_nothing(run_dir) and not resume:
        raise UserInputError(f"{run_dir} is not empty: pass --resume to continue it, or pick another --out")
    main_process = process_state().is_main_process
    with hold_directory(run_dir, enabled=main_process):
        if main_process:
            remove_temporaries(run_dir)
            for checkpoint in (run_dir / CHECKPOINTS).glob("step_*"):
                if not (checkpoint / STEP_NAME).is_file():  # killed while saving: never resumed from
                    shutil.rmtree(checkpoint)
        return _distill(data, run_dir, config, images, resume, progress, command)


def _distill(data: str, run_dir: Path, config: DistillConfig, images: str | None, resume: bool, progress: bool,
             command: str) -> dict[str, Any]:
    checkpoint = _resume_point(run_dir, config.steps) if resume else None
    if config.student_from and config.inherit_from:
        raise UserInputError("give either student_from (a copy of a model) or inherit_from (a slice into --student)")
    if config.prune.target_sparsity > 0 and not config.student_from:
        raise UserInputError("a target sparsity needs --student-from (the model whose copy is masked and pruned)")
    plain_urls = _plain_image_text_shards(data)
    if plain_urls and not config.online_teachers:
        raise UserInputError(f"{data} is image-text data without teacher embeddings: write a reinforced dataset "
                             "with `mobiledistill reinforce`, or give --online-teacher SPEC")
    info = None if plain_urls else read_info(data)
    image_shards = pair_image_shards(info.shards, images) if images and info is not None else None
    if info is not None and not config.online_teachers:
        dims = info.dims
        if dims is None:
            raise UserInputError(f"{data}: config.json does not give the teachers' dimensions")
        skips = SkipLog()
        if next(reinforced_records(info, info.shards, skips, image_shards), None) is None:
            reason = skips.samples[0]["reason"] if skips.samples else skips.summary()
            raise UserInputError(f"no readable samples in {data} (the first: {reason})")
        teacher_scales = [float(t["logit_scale"]) for t in info.teachers]

    accelerator = make_accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.grad_accum_steps,
                              log_with="tensorboard", project_dir=str(run_dir))
    if config.batch_size % accelerator.num_processes:  # before anything is loaded or written
        raise UserInputError(f"batch_size {config.batch_size} is not divisible by the {accelerator.num_processes} "
                             "processes")
    set_seed(config.seed)
    loaded = load_model(config.student_from or config.student, device=accelerator.device, warn_random=False)
    model = loaded.model
    size = loaded.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    ensemble = None
    if config.online_teachers:  # teachers in the loop (open_clip / TinyCLIP style), for comparison
        ensemble = load_ensemble(config.online_teachers, device=accelerator.device)
        dims, teacher_scales = ensemble.dims, ensemble.logit_scales
        teacher_records = [{"spec": str(t.spec), "dim": d, "logit_scale": s}
                           for t, d, s in zip(ensemble.teachers, dims, teacher_scales)]
    else:
        teacher_records = info.teachers
    if info is not None:
        augmentation, urls = info.augmentation, info.shards
        source = ReinforcedSource(info, image_shards, config.seed, config.aug_sampling, embeddings=ensemble is None,
                                  captions=config.captions)
    else:  # views at the largest input size among the teachers and the student, each model resizing its own
        largest = max([size, *(t.image_size[0] for t in ensemble.teachers)])
        augmentation, urls, source = AugmentationConfig(size=largest), plain_urls, ImageTextSource()
    inheritance = None
    if config.inherit_from:
        teacher_model = load_model(config.inherit_from, warn_random=False).model
        inheritance = inherit_weights(model, teacher_model)
        if accelerator.is_main_process:
            print(inheritance.table())
        del teacher_model
    if not 0 <= config.loss.reference_teacher < len(dims):
        raise UserInputError(f"loss.reference_teacher={config.loss.reference_teacher} but there are {len(dims)} "
                             "teachers")
    locked, locked_cache = lock_text_tower(model, loaded.tokenizer, accelerator.device, config.lock_text)
    masks, pruning = None, source_pruning(config.student_from)
    if config.prune.target_sparsity > 0:  # automatic inheritance: learned masks, sliced at the end (distill.prune)
        if pruning and pruning["count"] != config.prune.count:
            raise UserInputError(f"{config.student_from} was pruned counting {pruning['count']!r} "
                                 f"parameters; this stage has prune.count={config.prune.count!r}")
        masks = attach_masks(model, pruning.get("reference_params"), config.prune.start_sparsity,
                             config.prune.target_sparsity, round(config.prune.warmup * config.steps),
                             config.prune.init_log_alpha, config.prune.count).to(accelerator.device)
        mask_optimizer = masks.optimizer(config.prune.mask_lr, config.prune.lambda_lr)
    student_dim, ref_dim = loaded.embed_dim, dims[config.loss.reference_teacher]
    projection = nn.Linear(student_dim, ref_dim, bias=False).to(accelerator.device) \
        if config.loss.w_feature and student_dim != ref_dim else None
    optimizer = make_optimizer(model, config.lr, config.weight_decay, extra=[projection] if projection else [])
    scheduler = make_schedule(optimizer, config.steps, config.warmup_steps)
    student, optimizer = accelerator.prepare(StudentStep(model, loaded.tokenizer, locked_cache, projection), optimizer)

    trained = {"student": model}
    optimizers = {"student": optimizer}
    if projection is not None:
        trained["projection"] = projection
    if masks is not None:
        trained["masks"], optimizers["masks"] = masks, mask_optimizer
    state = TrainingState(trained, optimizers, scheduler, accelerator.scaler)
    start_step = load_checkpoint(checkpoint, state, accelerator) if checkpoint is not None else 0
    if start_step and accelerator.is_main_process:  # a finished run continued to more steps is unfinished again
        (run_dir / CONFIG_NAME).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
        accelerator.init_trackers("tensorboard")

    per_process = config.batch_size // accelerator.num_processes
    workers = default_num_workers() if config.num_workers is None else config.num_workers
    resumed_data = state.local.get("data") if start_step else None
    if resumed_data and resumed_data.get("workers") != max(1, workers) and accelerator.is_main_process:
        warnings.warn(f"{run_dir} was saved with {resumed_data.get('workers')} data workers and resumes with "
                      f"{max(1, workers)}: the data order from here differs from the uninterrupted run's", stacklevel=2)
    examples = DistillExamples(augmentation, size, loaded.preprocess_cfg["mean"], loaded.preprocess_cfg["std"],
                               config.seed, teacher_views=ensemble is not None)
    stream = ExampleStream(urls, source, examples, per_process, config.seed, config.shuffle_buffer,
                           accelerator.process_index, accelerator.num_processes, workers, resumed_data)
    tracker = StreamTracker(workers, resumed_data)
    loader = make_loader(stream, workers, config.seed, pin_memory=accelerator.device.type == "cuda")
    batches = usable_batches(loader, tracker, "the training data")

    eval_root = config.eval_data or (info.config.get("source") if info is not None else str(data))
    can_eval = bool(eval_root) and Path(eval_root, config.eval_split).is_dir()
    log_path = run_dir / "log.jsonl"
    rows = _logged_rows(log_path, start_step) if start_step else []

    def losses(batch: Batch, step: int) -> dict[str, torch.Tensor]:
        if ensemble is not None:
            batch.image_emb, batch.text_emb, batch.syn_emb = _online_teacher_embeddings(
                ensemble, batch.teacher_images, batch.captions, batch.syn_captions)
        if masks is not None:
            masks.apply(model, masks.sample())
        terms = compute_losses(student, batch, config, dims, teacher_scales)
        if masks is not None:
            terms.update(masks.lagrangian(step))
        return terms

    def nan_hint(step: int) -> str:
        last = last_checkpoint(run_dir)
        return f"; last good checkpoint: {last if last else 'none (no checkpoint saved yet)'}"

    def evaluating(done: int) -> bool:
        return bool(config.eval_every) and done % config.eval_every == 0

    def on_log(row: dict[str, Any], done: int) -> None:
        if can_eval and evaluating(done) and done < config.steps:
            if masks is not None:  # the model the prune step would cut now
                masks.apply(model, masks.deterministic())
            row["eval_top1"] = evaluate_model(loaded, eval_root, config.eval_split,
                                              progress=False).get("zeroshot", {}).get("top1", float("nan"))
            student.train()

    def end_of_step(done: int, rows: list[dict[str, Any]]) -> None:
        # The last step is saved too, so a finished run can be continued to more steps (`--resume --steps`).
        if config.save_every and (done % config.save_every == 0 or done == config.steps):
            if accelerator.is_main_process:  # the log first: a checkpoint never runs ahead of its log
                _write_log(log_path, rows)
            state.local["data"] = tracker.state()  # where this process's data workers stand: resumed, they go on there
            save_checkpoint(run_dir / CHECKPOINTS / f"step_{done}", state, done, accelerator)

    start = time.time()
    loop = LoopConfig(config.steps, config.grad_accum_steps, config.grad_clip, config.log_every,
                      samples_per_step=config.batch_size * config.grad_accum_steps)
    rows = train_loop(accelerator, student, model, optimizer, scheduler, batches, losses, loop, start_step=start_step,
                      rows=rows, desc="distill", progress=progress, nan_hint=nan_hint, log_also=evaluating,
                      after_update=(lambda: masks.update(mask_optimizer, accelerator)) if masks is not None else None,
                      on_log=on_log, end_of_step=end_of_step)
    accelerator.wait_for_everyone()

    skips = SkipLog()
    for other in gather_object([tracker.skips.as_dict()]):  # each process read its own shards
        skips.merge(other)
    bytes_per_process = gather_object([tracker.bytes_read])
    summary: dict[str, Any] = {"steps": config.steps, "wall_s": round(time.time() - start, 1),
                               "final_loss": rows[-1]["loss"], "resumed_from": start_step,
                               "skipped_samples": skips.sample_count, "skips": skips.as_dict(),
                               "data": {"num_workers": workers, "bytes_read_per_process": bytes_per_process}}
    if masks is not None:  # the prune step: deterministic masks, weights sliced, masks gone
        model, loaded.model_cfg, pruning = prune_model(model, loaded.model_cfg, masks)
        loaded.model = model
    elif pruning:  # a continuation of a pruned model keeps its record
        counted = counted_parameters(model, pruning["count"])
        pruning = {**pruning, "params": counted, "tower_params": tower_parameter_count(model),
                   "achieved_sparsity": 1 - counted / pruning["reference_params"]}
    summary["prune"] = pruning or None
    if accelerator.is_main_process:
        _write_log(log_path, rows)
        save_curves(rows, run_dir / "curves.png")
        evaluation = evaluate_model(loaded, eval_root, config.eval_split, progress=False) if can_eval else None
        provenance = {"command": command, "recipe": asdict(config), "data": str(data), "images": images,
                      "teachers": teacher_records, "online_teachers": bool(config.online_teachers),
                      "steps": config.steps, "seed": config.seed, "train": summary,
                      "inheritance": inheritance.as_dict() if inheritance else None, "prune": pruning or None,
                      "text_locked": locked, "evaluation": evaluation}
        write_model_files(model, loaded.model_cfg, run_dir, tokenizer=loaded.tokenizer, provenance=provenance)
        summary["evaluation"] = evaluation
    accelerator.wait_for_everyone()
    accelerator.end_training()  # trackers closed, then the process group (nothing collective after it)
    return summary
