"""Progressive automatic inheritance: stages that each prune the previous stage's output further.

A recipe with `stages` (a list of key overrides, e.g. `prune.target_sparsity` 0.25 then 0.5 then 0.75) runs them in
order, each starting from the previous stage's model (the first from `student_from`), with the same teachers (the
reinforced dataset's) throughout. Sparsity is always measured against the first source's parameters.

    RUN_DIR/stages.yaml              the resolved recipe (a rerun with another recipe is refused)
    RUN_DIR/stage-<i>/masked/        masks learned for prune_at * steps, then sliced: a pruned model directory
    RUN_DIR/stage-<i>/               the sliced model fine-tuned for the remaining steps (fresh optimizer)
    RUN_DIR/                         the last stage's model, with every stage's figures in mobiledistill.json

A stage without a target sparsity trains the copy without masks. Each of these is an ordinary `distill` run
directory, so a finished one (an open_clip model directory) is reused and the first unfinished one continues from
its last checkpoint, as `--resume` does for one run. A single `--target-sparsity` run is a one-stage chain.
"""

import dataclasses
import time
from pathlib import Path
from typing import Any

import yaml

from distill.recipe import DistillConfig, PruneConfig, stage_config
from distill.train import distill
from mdcore.atomic import copy_file_atomic, write_json_atomic, write_text_atomic
from mdcore.errors import UserInputError
from mdcore.locks import hold_directory, holds_nothing
from mdcore.names import STAGES_RECIPE
from mdcore.processes import process_state
from mdmodels.model_dir import CONFIG_NAME, PROVENANCE_NAME, is_model_dir, read_provenance

__all__ = ["is_staged", "run_stages"]


def is_staged(config: DistillConfig) -> bool:
    """Whether `config` asks for stages or masks (then `run_stages` runs it, else `distill.train.distill`)."""
    return bool(config.stages) or config.prune.target_sparsity > 0


def _run_stage(data: str, stage_dir: Path, config: DistillConfig, images: str | None, progress: bool,
               command: str) -> dict[str, Any]:
    """One stage: masked training then slicing (stage_dir/masked), then fine-tuning the sliced model (stage_dir)."""
    pruning = config.prune.target_sparsity > 0
    masked_steps = min(config.steps, max(1, round(config.prune.prune_at * config.steps))) if pruning else 0
    if pruning:
        masked_dir = stage_dir / "masked"
        if not is_model_dir(masked_dir):
            distill(data, masked_dir, dataclasses.replace(config, steps=masked_steps), images=images, resume=True,
                    progress=progress, command=command)
        if masked_steps == config.steps:
            return {"masked_dir": masked_dir, "model_dir": masked_dir}
        config = dataclasses.replace(config, steps=config.steps - masked_steps, student_from=str(masked_dir),
                                     prune=PruneConfig())
    if not is_model_dir(stage_dir):
        distill(data, stage_dir, config, images=images, resume=True, progress=progress, command=command)
    return {"masked_dir": stage_dir / "masked" if pruning else None, "model_dir": stage_dir}


def _stage_record(index: int, config: DistillConfig, model_dir: Path) -> dict[str, Any]:
    provenance = read_provenance(model_dir)
    prune = provenance.get("prune") or {}
    zeroshot = (provenance.get("evaluation") or {}).get("zeroshot") or {}
    return {"stage": index, "model_dir": str(model_dir), "steps": config.steps,
            "target_sparsity": config.prune.target_sparsity, "achieved_sparsity": prune.get("achieved_sparsity"),
            "params": prune.get("params"), "reference_params": prune.get("reference_params"),
            "top1": zeroshot.get("top1"), "wall_s": (provenance.get("train") or {}).get("wall_s")}


def _publish(model_dir: Path, run_dir: Path, extra: dict[str, Any]) -> None:
    """Copy the last stage's model files into run_dir, its config last (until then run_dir does not load)."""
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name != CONFIG_NAME:
            copy_file_atomic(path, run_dir / path.name)
    provenance = {**read_provenance(model_dir), **extra}
    write_json_atomic(run_dir / PROVENANCE_NAME, provenance)
    copy_file_atomic(model_dir / CONFIG_NAME, run_dir / CONFIG_NAME)


def run_stages(data: str, run_dir: str | Path, config: DistillConfig, images: str | None = None,
               resume: bool = False, progress: bool = True, command: str = "") -> dict[str, Any]:
    """Run every stage of `config` in order (one stage when it has none), reusing finished ones; `run_dir` ends as
    the last stage's model directory. Returns a summary like `distill`'s with the stages' records."""
    run_dir = Path(run_dir)
    if is_model_dir(run_dir):
        raise UserInputError(f"{run_dir} holds a finished run (delete it or pick another --out)")
    if not holds_nothing(run_dir) and not resume:
        raise UserInputError(f"{run_dir} is not empty: pass --resume to continue it, or pick another --out")
    if not config.student_from:
        raise UserInputError("stages and target sparsities need --student-from (the model the first stage copies)")
    stages = [stage_config(config, i) for i in range(len(config.stages))] or [dataclasses.replace(config)]
    main_process = process_state().is_main_process
    with hold_directory(run_dir, enabled=main_process):  # one run at a time on run_dir
        recipe = yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
        recipe_path = run_dir / STAGES_RECIPE
        if recipe_path.is_file() and recipe_path.read_text() != recipe:
            raise UserInputError(f"{run_dir} holds stages of another recipe ({recipe_path}); pick another --out")
        if main_process:
            write_text_atomic(recipe_path, recipe)

        start = time.time()
        source, records = config.student_from, []
        for index, stage in enumerate(stages):
            stage = dataclasses.replace(stage, student_from=source)
            dirs = _run_stage(data, run_dir / f"stage-{index}", stage, images, progress, command)
            records.append(_stage_record(index, stage, dirs["model_dir"]))
            source = str(dirs["model_dir"])
        last = Path(source)
        _publish(last, run_dir, {"command": command, "stages": records})
        provenance = read_provenance(run_dir)
        return {"steps": sum(s.steps for s in stages), "wall_s": round(time.time() - start, 1),
                "final_loss": (provenance.get("train") or {}).get("final_loss", float("nan")),
                "evaluation": provenance.get("evaluation"), "prune": provenance.get("prune"), "stages": records}
