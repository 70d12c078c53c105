"""Training checkpoints that load without running code: tensors in safetensors, everything else in JSON.

    RUN_DIR/checkpoints/step_<N>/
        modules.safetensors      every trained module's weights, keyed "<module>.<parameter>" (student, projection,
                                 pruning masks)
        optimizers.safetensors   every optimizer's state tensors, keyed "<optimizer>/<param index>/<name>"
        state.json               the optimizers' param groups and scalar state, the schedule, the gradient scaler
        process-<rank>.json      each process's Python, NumPy and torch random states and its `local` values
        step.json                written last, by the main process once every process has saved: marks it complete

accelerate's `save_state` pickles the optimizer, the schedule, the random states and registered objects, and
`load_state` unpickles them, `custom_checkpoint_*.pkl` with `weights_only=False`: a file planted there runs code
on resume. Nothing here is read with pickle, and files a checkpoint does not name are never opened. Every value is
checked against the live objects it is loaded into (names, shapes, types) before it is used, and a malformed
checkpoint is a `UserInputError`, never a traceback or a half-restored run.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mdcore.atomic import hidden_temporary, write_json_atomic
from mdcore.errors import UserInputError, first_line
from mdcore.jsonio import read_json_file

__all__ = ["TrainingState", "save_checkpoint", "load_checkpoint", "last_checkpoint", "checkpoint_step"]

FORMAT = "mobiledistill-checkpoint-1"
STEP_NAME = "step.json"
MODULES_NAME = "modules.safetensors"
OPTIMIZERS_NAME = "optimizers.safetensors"
STATE_NAME = "state.json"
_ACCELERATE_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "model.safetensors")


@dataclass
class TrainingState:
    """What a checkpoint holds: named modules (unwrapped), named optimizers, the schedule, the loss scaler."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    scheduler: Any  # an LRScheduler (accelerate's wrapper passes state_dict through)
    scaler: Any = None  # accelerate's GradScaler under fp16 mixed precision
    local: dict[str, Any] = field(default_factory=dict)  # this process's own small JSON values (its data position)


def checkpoint_step(path: Path) -> int:
    """The step a complete checkpoint directory was saved at (from its step.json)."""
    record = read_json_file(path / STEP_NAME, max_bytes=4096)
    step = record.get("step")
    if type(step) is not int or step < 0:
        raise UserInputError(f"{path / STEP_NAME} does not hold a step number")
    return step


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under `run_dir/checkpoints` (one with a step.json), or None."""
    steps = []
    for path in (Path(run_dir) / "checkpoints").glob("step_*"):
        suffix = path.name[len("step_"):]
        if suffix.isdigit() and (path / STEP_NAME).is_file():
            steps.append((int(suffix), path))
    return max(steps)[1] if steps else None


# ------------------------------------------------------------------------------------------------------------ save


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = hidden_temporary(path)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def _optimizer_record(name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict:
    state_dict = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": state_dict["param_groups"], "scalar_state": scalars}


def _rng_record() -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    record = {"python": [version, list(mt_state), gauss],
              "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
              "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        record["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return record


def save_checkpoint(path: Path, state: TrainingState, step: int, accelerator) -> None:
    """Write a checkpoint of `state` at `step` into `path` from every process (call it on all of them)."""
    path = Path(path)
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    write_json_atomic(path / f"process-{accelerator.process_index}.json", {"rng": _rng_record(), "local": state.local})
    if accelerator.is_main_process:
        modules = {f"{name}.{key}": value for name, module in state.modules.items()
                   for key, value in module.state_dict().items()}
        _save_tensors(modules, path / MODULES_NAME)
        tensors: dict[str, torch.Tensor] = {}
        record = {"format": FORMAT,
                  "optimizers": {n: _optimizer_record(n, o, tensors) for n, o in state.optimizers.items()},
                  "scheduler": state.scheduler.state_dict(),
                  "scaler": state.scaler.state_dict() if state.scaler is not None else None,
                  "processes": accelerator.num_processes}
        _save_tensors(tensors, path / OPTIMIZERS_NAME)
        write_json_atomic(path / STATE_NAME, record)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(path / STEP_NAME, {"step": step})  # written last: marks the checkpoint complete


# ------------------------------------------------------------------------------------------------------------ load


def _same_kind(value: Any, template: Any) -> bool:
    """Whether a JSON value can stand for `template` (numbers for numbers, same container shapes)."""
    if template is None or value is None:
        return template is None and value is None
    if isinstance(template, bool) or isinstance(value, bool):
        return isinstance(template, bool) and isinstance(value, bool)
    if isinstance(template, (int, float)):
        return isinstance(value, (int, float))
    if isinstance(template, (list, tuple)):
        return isinstance(value, list) and len(value) == len(template) and all(
            _same_kind(v, t) for v, t in zip(value, template))
    if isinstance(template, dict):
        return isinstance(value, dict) and set(value) == set(template) and all(
            _same_kind(value[k], template[k]) for k in template)
    return type(value) is type(template)


def _conform(value: Any, template: Any) -> Any:
    """`value` with lists turned back into tuples where the template has tuples (Adam's betas)."""
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(_conform(v, t) for v, t in zip(value, template))
    if isinstance(template, dict) and isinstance(value, dict):
        return {k: _conform(v, template.get(k)) for k, v in value.items()}
    return value


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserInputError(f"{path} is not a readable safetensors file: {first_line(e)}") from e


def _restore_optimizer(name: str, optimizer: torch.optim.Optimizer, record: Any, tensors: dict[str, torch.Tensor],
                       where: Path) -> None:
    live = optimizer.state_dict()
    if not isinstance(record, dict) or not _same_kind(record.get("param_groups"), live["param_groups"]):
        raise UserInputError(f"{where}: optimizer {name!r} has other parameter groups than this run's")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    prefix = f"{name}/"
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            continue
        index, _, entry = key[len(prefix):].partition("/")
        if not index.isdigit() or int(index) >= len(params) or not entry:
            raise UserInputError(f"{where}: optimizer tensor {key!r} names no parameter of this run")
        param = params[int(index)]
        if tensor.ndim and tensor.shape != param.shape or not tensor.is_floating_point():
            raise UserInputError(f"{where}: optimizer tensor {key!r} has shape {tuple(tensor.shape)} "
                                 f"({tensor.dtype}); its parameter has {tuple(param.shape)}")
        state.setdefault(int(index), {})[entry] = tensor
    scalars = record.get("scalar_state", {})
    if not isinstance(scalars, dict):
        raise UserInputError(f"{where}: optimizer {name!r} scalar state is not an object")
    for index, entries in scalars.items():
        if not str(index).isdigit() or int(index) >= len(params) or not isinstance(entries, dict) or not all(
                isinstance(v, (int, float, bool)) for v in entries.values()):
            raise UserInputError(f"{where}: optimizer {name!r} has malformed scalar state")
        state.setdefault(int(index), {}).update(entries)
    groups = _conform(record["param_groups"], live["param_groups"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserInputError(f"{where}: optimizer {name!r} does not load: {first_line(e)}") from e


def _restore_process(path: Path) -> dict[str, Any]:
    """Restore this process's random states from its record; returns its `local` values."""
    process = read_json_file(path, max_bytes=1 << 20)
    record, local = process.get("rng"), process.get("local", {})
    if not isinstance(record, dict) or not isinstance(local, dict):
        raise UserInputError(f"{path} does not hold random states and local values")
    try:
        version, mt_state, gauss = record["python"]
        random.setstate((version, tuple(mt_state), gauss))
        name, keys, pos, has_gauss, cached = record["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(torch.tensor(record["torch"], dtype=torch.uint8))
        if "cuda" in record and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in record["cuda"]])
    except (KeyError, ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise UserInputError(f"{path} does not hold random states: {first_line(e)}") from e
    return local


def load_checkpoint(path: Path, state: TrainingState, accelerator) -> int:
    """Restore `state` from the checkpoint at `path` (on every process); returns the step it was saved at."""
    path = Path(path)
    step = checkpoint_step(path)
    if not (path / STATE_NAME).is_file() and any((path / name).exists() for name in _ACCELERATE_FILES):
        raise UserInputError(f"{path} was written in accelerate's pickle format, which mobiledistill no longer loads "
                             "(a pickle can run code); start the run again in a new --out")
    record = read_json_file(path / STATE_NAME)
    if record.get("format") != FORMAT:
        raise UserInputError(f"{path / STATE_NAME} is not a {FORMAT} record")
    if record.get("processes") != accelerator.num_processes:
        raise UserInputError(f"{path} was saved by {record.get('processes')} processes; resume it with as many "
                             f"(this run has {accelerator.num_processes})")
    modules = _load_tensors(path / MODULES_NAME)
    for name, module in state.modules.items():
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in modules.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(own, strict=True)
        except RuntimeError as e:
            raise UserInputError(f"{path / MODULES_NAME}: {name} does not match this run's: {first_line(e)}") from e
    unknown = [k for k in modules if not any(k.startswith(f"{n}.") for n in state.modules)]
    if unknown:
        raise UserInputError(f"{path / MODULES_NAME} holds weights of no module of this run ({unknown[0]})")
    tensors = _load_tensors(path / OPTIMIZERS_NAME)
    optimizers = record.get("optimizers")
    if not isinstance(optimizers, dict) or set(optimizers) != set(state.optimizers):
        raise UserInputError(f"{path / STATE_NAME}: optimizers {sorted(optimizers or {})} are not this run's "
                             f"{sorted(state.optimizers)}")
    for name, optimizer in state.optimizers.items():
        _restore_optimizer(name, optimizer, optimizers[name], tensors, path / OPTIMIZERS_NAME)
    scheduler, template = record.get("scheduler"), state.scheduler.state_dict()
    # the live schedule's keys, of their kinds; others are ignored (a torch LambdaLR's, in earlier checkpoints)
    if not isinstance(scheduler, dict) or not _same_kind({k: scheduler.get(k) for k in template}, template):
        raise UserInputError(f"{path / STATE_NAME}: the learning-rate schedule's state is malformed")
    state.scheduler.load_state_dict(scheduler)
    if state.scaler is not None:
        if not _same_kind(record.get("scaler"), state.scaler.state_dict()):
            raise UserInputError(f"{path / STATE_NAME}: the gradient scaler's state is malformed")
        state.scaler.load_state_dict(record["scaler"])
    state.local = _restore_process(path / f"process-{accelerator.process_index}.json")
    return step
