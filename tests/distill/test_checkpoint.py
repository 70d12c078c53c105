"""Checkpoints load without running code, refuse malformed files in one line, and resume exactly."""

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.checkpoint import TrainingState, last_checkpoint, load_checkpoint, save_checkpoint
from distill.loop import make_schedule
from distill.recipe import load_recipe
from distill.train import distill
from mdcore.errors import UserInputError
from mobiledistill.cli import main
from mobiledistill.stages import run_stages


class _Planted:
    """A pickle that creates a marker file when it is unpickled: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(directory: Path, marker: Path) -> None:
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                 "scheduler.bin", "scaler.pt", "pytorch_model.bin"):
        torch.save({"payload": _Planted(marker)}, directory / name)
    with open(directory / "planted.pkl", "wb") as f:
        pickle.dump(_Planted(marker), f)


def _state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98))
    scheduler = make_schedule(optimizer, steps=8, warmup_steps=2)
    return TrainingState({"student": model}, {"student": optimizer}, scheduler)


def _train(state: TrainingState, steps: int) -> None:
    model, optimizer = state.modules["student"], state.optimizers["student"]
    for _ in range(steps):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        state.scheduler.step()
        optimizer.zero_grad()


def test_checkpoint_round_trip_restores_weights_optimizer_schedule_and_random_states(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    state = _state()
    _train(state, 3)
    save_checkpoint(tmp_path / "step_3", state, 3, accelerator)
    draws = (random.random(), np.random.rand(), torch.rand(3))  # what each generator gives next
    _train(state, 2)  # the uninterrupted run goes on
    reference = {k: v.clone() for k, v in state.modules["student"].state_dict().items()}

    random.seed(1), np.random.seed(1), torch.manual_seed(1)  # the resuming process starts elsewhere
    resumed = _state(seed=1)  # other initial weights: everything must come from the checkpoint
    assert load_checkpoint(tmp_path / "step_3", resumed, accelerator) == 3
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == draws[:2] and torch.equal(again[2], draws[2])
    _train(resumed, 2)
    assert all(torch.equal(v, reference[k]) for k, v in resumed.modules["student"].state_dict().items())
    assert resumed.scheduler.get_last_lr() == state.scheduler.get_last_lr()
    assert last_checkpoint(tmp_path.parent / tmp_path.name) is None  # only checkpoints/step_N is looked at


def test_the_schedule_is_open_clips_and_resumes_from_a_torch_schedulers_state(tmp_path):
    from accelerate import Accelerator
    from open_clip_train.scheduler import cosine_lr

    state = _state()
    optimizer = state.optimizers["student"]
    reference = cosine_lr(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1e-2), 1e-2, 2, 8)
    lrs = [state.scheduler.get_last_lr()[0]]
    for _ in range(8):
        state.scheduler.step()
        lrs.append(state.scheduler.get_last_lr()[0])
        assert optimizer.param_groups[0]["lr"] == lrs[-1]  # every group follows it
    assert lrs == [reference(s) for s in range(9)]
    assert lrs[0] == 5e-3 and lrs[2] == 1e-2 and lrs[-1] == 0.0  # from lr/warmup, to lr, down to 0 at the end
    state.scheduler.step()
    assert state.scheduler.get_last_lr()[0] == 0.0  # past the end it stays at 0

    one_step = make_schedule(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0), steps=1, warmup_steps=5)
    one_step.step()
    assert one_step.get_last_lr() == [1.0]  # a 1-step run: warm-up of 1, no division by steps - warmup = 0

    accelerator = Accelerator(cpu=True)  # a checkpoint written when the schedule was a torch LambdaLR still loads
    _train(state, 1)
    save_checkpoint(tmp_path / "step_3", state, 3, accelerator)
    record = json.loads((tmp_path / "step_3" / "state.json").read_text())
    record["scheduler"] = {"base_lrs": [1e-2], "last_epoch": 3, "_step_count": 4, "_is_initial": False,
                           "_get_lr_called_within_step": False, "_last_lr": [0.0], "lr_lambdas": [None]}
    (tmp_path / "step_3" / "state.json").write_text(json.dumps(record))
    resumed = _state()
    load_checkpoint(tmp_path / "step_3", resumed, accelerator)
    assert resumed.scheduler.get_last_lr() == [reference(3)]


def test_files_a_checkpoint_does_not_name_are_never_opened(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    state = _state()
    save_checkpoint(tmp_path / "step_1", state, 1, accelerator)
    marker = tmp_path / "pwned"
    _plant(tmp_path / "step_1", marker)
    load_checkpoint(tmp_path / "step_1", _state(), accelerator)
    assert not marker.exists()


def _corrupt_modules(path: Path) -> None:
    (path / "modules.safetensors").write_bytes(pickle.dumps({"not": "safetensors"}))


def _corrupt_step(path: Path) -> None:
    (path / "step.json").write_text("{'step': 3")


def _corrupt_optimizer_shape(path: Path) -> None:
    tensors = load_file(str(path / "optimizers.safetensors"))
    key = next(k for k, v in tensors.items() if v.ndim == 2)
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(path / "optimizers.safetensors"))


def _corrupt_groups(path: Path) -> None:
    record = json.loads((path / "state.json").read_text())
    record["optimizers"]["student"]["param_groups"][0]["lr"] = "print('hi')"
    (path / "state.json").write_text(json.dumps(record))


def _corrupt_schedule(path: Path) -> None:
    record = json.loads((path / "state.json").read_text())
    record["scheduler"]["last_epoch"] = {"__call__": "evil"}
    (path / "state.json").write_text(json.dumps(record))


def _corrupt_rng(path: Path) -> None:
    (path / "process-0.json").write_text(json.dumps({"rng": {"python": [3, [1, 2], None], "numpy": [], "torch": [1]}}))


def _deep_state(path: Path) -> None:
    (path / "state.json").write_text("[" * 100_000 + "]" * 100_000)


def _accelerate_format(path: Path) -> None:
    for name in ("state.json", "modules.safetensors", "optimizers.safetensors"):
        (path / name).unlink()
    torch.save({}, path / "optimizer.bin")


@pytest.mark.parametrize("corrupt, message", [
    (_corrupt_modules, "not a readable safetensors"), (_corrupt_step, "not valid JSON"),
    (_corrupt_optimizer_shape, "has shape"), (_corrupt_groups, "parameter groups"),
    (_corrupt_schedule, "schedule"), (_corrupt_rng, "random states"), (_deep_state, "nested too deeply"),
    (_accelerate_format, "pickle format"),
], ids=lambda x: getattr(x, "__name__", "")[1:] if callable(x) else "")
def test_a_malformed_checkpoint_is_one_user_error(tmp_path, corrupt, message):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    state = _state()
    _train(state, 1)
    save_checkpoint(tmp_path / "step_1", state, 1, accelerator)
    corrupt(tmp_path / "step_1")
    with pytest.raises(UserInputError, match=message):
        load_checkpoint(tmp_path / "step_1", _state(), accelerator)


def _unfinish(run: Path, keep_step: int) -> None:
    """Make a finished run look killed right after the checkpoint of `keep_step`."""
    (run / "open_clip_config.json").unlink()
    for checkpoint in (run / "checkpoints").glob("step_*"):
        if int(checkpoint.name.split("_")[1]) > keep_step:
            shutil.rmtree(checkpoint)


def test_a_planted_pickle_in_a_pruned_run_never_runs_on_resume(one_teacher_reinforced, tiny_model_dirs, tmp_path):
    """The break the security review found: accelerate's load_state unpickled `custom_checkpoint_*.pkl` (the
    registered masks) with weights_only=False, and a pruned stage always resumes."""
    overrides = ["steps=3", "batch_size=8", "warmup_steps=1", "log_every=1", "save_every=1",
                 f"student_from={tiny_model_dirs['teacher_b']}", "prune.target_sparsity=0.3"]
    run = tmp_path / "run"
    run_stages(str(one_teacher_reinforced), run, load_recipe(None, overrides), progress=False)
    uninterrupted = load_file(str(run / "open_clip_model.safetensors"))
    masked = run / "stage-0" / "masked"
    assert (masked / "checkpoints" / "step_2" / "step.json").is_file()
    for directory in (run, run / "stage-0"):
        (directory / "open_clip_config.json").unlink()
    _unfinish(masked, keep_step=1)  # killed after the masked run's step-1 checkpoint
    marker = tmp_path / "pwned"
    _plant(masked / "checkpoints" / "step_1", marker)
    argv = ["distill", "--data", str(one_teacher_reinforced), "--out", str(run), "--resume", *overrides]
    assert main(argv) == 0
    assert not marker.exists()
    resumed = load_file(str(run / "open_clip_model.safetensors"))  # the masks resumed exactly: the same slices
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_resume_refuses_a_corrupt_checkpoint_in_one_line(one_teacher_reinforced, tmp_path, capsys):
    overrides = ["steps=2", "batch_size=8", "warmup_steps=1", "log_every=1", "save_every=1"]
    run = tmp_path / "run"
    distill(str(one_teacher_reinforced), run, load_recipe(None, overrides), progress=False)
    _unfinish(run, keep_step=1)
    _corrupt_modules(run / "checkpoints" / "step_1")
    argv = ["distill", "--data", str(one_teacher_reinforced), "--out", str(run), "--resume", *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "modules.safetensors" in err


def test_a_finished_run_continues_to_more_steps_and_a_torn_log_line_is_dropped(one_teacher_reinforced, tmp_path):
    overrides = ["batch_size=8", "warmup_steps=1", "log_every=1", "save_every=2"]
    run = tmp_path / "run"
    first = distill(str(one_teacher_reinforced), run, load_recipe(None, ["steps=2", *overrides]), progress=False)
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    with pytest.raises(UserInputError, match="finished run of 2 steps"):
        distill(str(one_teacher_reinforced), run, load_recipe(None, ["steps=2", *overrides]), resume=True,
                progress=False)
    with (run / "log.jsonl").open("a") as log:
        log.write('{"step": 2, "loss": 1.')  # a kill in the middle of a log write
    more = distill(str(one_teacher_reinforced), run, load_recipe(None, ["steps=4", *overrides]), resume=True,
                   progress=False)
    assert first["steps"] == 2 and more["steps"] == 4 and more["resumed_from"] == 2
    continued = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in continued] == [0, 1, 2, 3] and continued[:2] == rows
    assert json.loads((run / "mobiledistill.json").read_text())["steps"] == 4
    (run / "log.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    _unfinish(run, keep_step=2)
    with pytest.raises(UserInputError, match="line 2 is not valid JSON"):
        distill(str(one_teacher_reinforced), run, load_recipe(None, ["steps=4", *overrides]), resume=True,
                progress=False)


def test_a_run_without_a_checkpoint_of_its_last_step_is_not_continued(one_teacher_reinforced, tmp_path):
    run = tmp_path / "run"
    overrides = ["batch_size=8", "warmup_steps=1", "log_every=1"]
    distill(str(one_teacher_reinforced), run, load_recipe(None, ["steps=1", *overrides]), progress=False)
    with pytest.raises(UserInputError, match="without a checkpoint"):
        distill(str(one_teacher_reinforced), run, load_recipe(None, ["steps=3", *overrides]), resume=True,
                progress=False)


def test_a_kill_mid_checkpoint_resumes_from_the_one_before_and_cleans_up(one_teacher_reinforced, tmp_path):
    overrides = ["steps=2", "batch_size=8", "warmup_steps=1", "log_every=1", "save_every=1"]
    reference = tmp_path / "reference"
    distill(str(one_teacher_reinforced), reference, load_recipe(None, overrides), progress=False)
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _unfinish(run, keep_step=1)
    partial = run / "checkpoints" / "step_2"  # killed while saving step 2: no step.json yet
    partial.mkdir()
    (partial / "modules.safetensors").write_bytes(b"half a file")
    (run / ".log.jsonl.tmp-4242").write_text('{"step": 0')
    distill(str(one_teacher_reinforced), run, load_recipe(None, overrides), resume=True, progress=False)
    assert not list(run.rglob(".*.tmp-*")) and (partial / "step.json").is_file()
    ours, theirs = (load_file(str(d / "open_clip_model.safetensors")) for d in (run, reference))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
