"""No command can destroy its own input or start writing where it must fail: one line, exit 2, nothing touched."""

import hashlib
import shutil
from pathlib import Path

import pytest

from mobiledistill.cli import main
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


def _set_json(path: Path, change) -> None:
    import json

    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _distill(*overrides):
    return ["distill", "--data", "{data}", "--out", "{tmp}/run", "--online-teacher", "{model}", *overrides]


BAD_INPUT = {
    "override steps=~": (_distill("steps=~"), "takes int"),
    "override log_every=0": (_distill("log_every=0"), "log_every must be >= 1"),
    "override grad_accum_steps=0": (_distill("grad_accum_steps=0"), "grad_accum_steps must be >= 1"),
    "override lr=-1": (_distill("lr=-1"), "lr must be > 0"),
    "override mixed_precision=foo": (_distill("mixed_precision=foo"), "mixed_precision must be one of"),
    "override not YAML": (_distill("steps=[1"), "not valid YAML"),
    "recipe not UTF-8": (_distill("--config", "{tmp}/latin1.yaml"), "not UTF-8"),
    "teacher lr negative": (["teachers", "train", "--data", "{data}", "--arch", "md-student-tiny", "--out",
                             "{tmp}/t", "--lr", "-1"], "lr must be > 0"),
    "teacher lr NaN": (["teachers", "train", "--data", "{data}", "--arch", "md-student-tiny", "--out", "{tmp}/t",
                        "--lr", "nan"], "lr must be > 0"),
    "eval batch size 0": (["eval", "--model", "{model}", "--data", "{data}", "--batch-size", "0"],
                          "batch size must be positive"),
    "reinforce crop scale 2": (["reinforce", "--data", "{data}", "--teacher", "{model}", "--num-captions", "0",
                                "--out", "{tmp}/dr", "--crop-scale-min", "2"], "crop scale"),
    "reinforce batch size 0": (["reinforce", "--data", "{data}", "--teacher", "{model}", "--num-captions", "0",
                                "--out", "{tmp}/dr", "--batch-size", "0"], "batch_size must be >= 1"),
    "emoji image size": (["data", "emoji", "--out", "{tmp}/emoji", "--image-size", "80000"], "--image-size"),
    "model image_size 80000": (["eval", "--model", "{tmp}/huge", "--data", "{data}"], "image_size 80000"),
    "model embed_dim a string": (["eval", "--model", "{tmp}/typo", "--data", "{data}"], "embed_dim 'big'"),
    "corrupt export report": (["bench", "{tmp}/export"], "export_report.json is not valid JSON"),
    "corrupt bench json": (["report", "{tmp}/run-with-bench", "--out", "{tmp}/r.html"], "does not hold bench"),
    "reinforced config types": (["inspect", "{tmp}/dr-bad"], "dim 'x' is not an integer"),
}


@pytest.fixture
def bad_files(inputs, one_teacher_reinforced) -> dict[str, Path]:
    tmp, model = inputs["tmp"], inputs["model"]
    (tmp / "latin1.yaml").write_bytes("steps: 10  # pas très long\n".encode("latin-1"))
    for name, change in (("huge", lambda c: c["model_cfg"]["vision_cfg"].update(image_size=80000)),
                         ("typo", lambda c: c["model_cfg"].update(embed_dim="big"))):
        shutil.copytree(model, tmp / name)
        _set_json(tmp / name / "open_clip_config.json", change)
    (tmp / "export").mkdir()
    (tmp / "export" / "export_report.json").write_text('{"model": ')
    shutil.copytree(model, tmp / "run-with-bench")
    (tmp / "run-with-bench" / "bench.json").write_text('{"results": [{"median_ms": "fast"}]}')
    shutil.copytree(one_teacher_reinforced, tmp / "dr-bad")
    _set_json(tmp / "dr-bad" / "config.json", lambda c: c["teachers"][0].update(dim="x"))
    return inputs


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2_before_any_output(bad_files, capsys, case):
    argv, message = BAD_INPUT[case]
    code = main([a.format(**bad_files) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    for out in ("run", "t", "dr", "emoji", "r.html"):
        assert not (bad_files["tmp"] / out).exists(), out
