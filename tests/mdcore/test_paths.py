"""Outputs never overwrite, delete or enclose an input, and cannot be placed where writing must fail."""

from pathlib import Path

import pytest

from mdcore.errors import UserInputError
from mdcore.paths import check_output, input_paths


@pytest.fixture
def model_dir(tmp_path) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "open_clip_config.json").write_text("{}")
    (directory / "open_clip_model.safetensors").write_bytes(b"weights")
    (directory / "eval.json").write_text("{}")
    return directory


def test_input_paths_of_specs_patterns_and_urls(tmp_path, model_dir):
    shards = tmp_path / "shards"
    shards.mkdir()
    assert input_paths([f"local-dir:{model_dir}", str(model_dir), None, "ViT-B-32@openai", "hf-hub:a/b",
                        "s3://bucket/x.tar", f"{shards}/{{000..009}}.tar"]) == [model_dir, model_dir, shards]
    assert input_paths(str(tmp_path / "missing")) == []


@pytest.mark.parametrize("out, message", [
    ("model", "is an input"), ("model/sub", "inside the input"), (".", "contains the input"),
])
def test_a_directory_output_may_not_be_inside_be_or_contain_an_input(model_dir, out, message):
    with pytest.raises(UserInputError, match=message):
        check_output(model_dir.parent / out, [str(model_dir)])
    check_output(model_dir.parent / "elsewhere", [str(model_dir)])


def test_a_file_output_inside_an_input_never_replaces_what_the_input_is_read_through(model_dir):
    check_output(model_dir / "bench.json", [model_dir], "--json", "file")  # a new report beside the model
    check_output(model_dir / "eval.json", [model_dir], "--json", "file")  # an earlier report of the same kind
    for name in ("open_clip_config.json", "mobiledistill.json", "open_clip_model.safetensors"):
        with pytest.raises(UserInputError, match="would replace a file of the input"):
            check_output(model_dir / name, [model_dir], "--json", "file")
    with pytest.raises(UserInputError, match="would replace"):
        check_output(model_dir / "checkpoints" / "step_1" / "rng-0.json", [model_dir], "--json", "file")


def test_outputs_under_a_file_or_of_the_wrong_kind_fail_before_any_work(tmp_path, model_dir):
    weights = model_dir / "open_clip_model.safetensors"
    with pytest.raises(UserInputError, match="which is a file"):
        check_output(weights / "out", [])
    with pytest.raises(UserInputError, match="which is a file"):
        check_output(weights / "a" / "b.json", [], "--json", "file")
    with pytest.raises(UserInputError, match="is a directory"):
        check_output(model_dir, [], "--json", "file")
    with pytest.raises(UserInputError, match="is a file"):
        check_output(weights, [])
