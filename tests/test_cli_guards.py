"""No command can destroy its own input or start writing where it must fail: one line, exit 2, nothing touched."""

import hashlib
import shutil
from pathlib import Path

import pytest

from distill.cli import main
from tests.conftest import write_shapes_root


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def inputs(tmp_path, tiny_model_dirs) -> dict[str, Path]:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["teacher_b"], model)
    data = write_shapes_root(tmp_path / "data", per_pair=1)
    weights = model / "open_clip_model.safetensors"
    return {"model": model, "data": data, "weights": weights, "tmp": tmp_path}


CASES = {
    "export over its model": (["export", "--model", "{model}", "--out", "{model}", "--overwrite"], "is an input"),
    "export into its model": (["export", "--model", "{model}", "--out", "{model}/exp"], "inside the input"),
    "export around its data": (["export", "--model", "{model}", "--data", "{data}", "--out", "{tmp}", "--overwrite"],
                               "contains the input"),
    "reinforce onto its data": (["reinforce", "--data", "{data}", "--teacher", "{model}", "--num-captions", "0",
                                 "--out", "{data}"], "is an input"),
    "reinforce into its data": (["reinforce", "--data", "{data}", "--teacher", "{model}", "--num-captions", "0",
                                 "--out", "{data}/dr"], "inside the input"),
    "train into its data": (["teachers", "train", "--data", "{data}", "--arch", "md-student-tiny", "--out",
                             "{data}/t"], "inside the input"),
    "distill into a teacher": (["distill", "--data", "{data}", "--online-teacher", "{model}", "--out",
                                "{model}/run"], "inside the input"),
    "eval json over a model file": (["eval", "--model", "{model}", "--data", "{data}", "--json",
                                     "{model}/open_clip_config.json"], "would replace a file"),
    "inspect html over a shard": (["inspect", "{data}", "--html", "{data}/train/0.tar"], "would replace a file"),
    "report over provenance": (["report", "{model}", "--out", "{model}/mobiledistill.json"], "would replace a file"),
    "bench json is a directory": (["bench", "{model}", "--json", "{data}"], "is a directory"),
    "out under a file": (["quickstart", "--out", "{weights}/demo"], "which is a file"),
    "data emoji under a file": (["data", "emoji", "--out", "{weights}/emoji"], "which is a file"),
}


@pytest.mark.parametrize("case", CASES)
def test_outputs_that_would_destroy_an_input_are_refused(inputs, capsys, case):
    argv, message = CASES[case]
    before = {name: _digest(inputs[name]) for name in ("model", "data")}
    code = main([a.format(**inputs) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert {name: _digest(inputs[name]) for name in ("model", "data")} == before
