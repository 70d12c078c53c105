"""Caption sets per captioner (Apple's newer layout), choosing captions at training time, and adding a captioner or
a teacher to a finished dataset without changing anything it stored."""

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mdcore.errors import UserInputError
from mobiledistill.cli import main
from reinforced_data.augment import AugmentationConfig
from reinforced_data.examples import CaptionChoice, ReinforcedSource
from reinforced_data.inspection import inspect_reinforced
from reinforced_data.reader import open_reinforced, read_info
from reinforced_data.shards import SkipLog, iter_raw_samples
from reinforced_data.storage import read_arrays
from teachers import extend
from teachers.extend import extend_reinforced
from teachers.reinforce import ReinforceConfig, parse_captioner, reinforce
from tests.conftest import write_shapes_root


def _config(**kw) -> ReinforceConfig:
    return ReinforceConfig(**{"num_augs": 2, "num_captions": 2, "dtype": "int8", "seed": 5, "num_workers": 0,
                              "caption_max_len": 8, "augmentation": AugmentationConfig(size=32), **kw})


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory, tiny_model_dirs) -> Path:
    root = write_shapes_root(tmp_path_factory.mktemp("data") / "shapes", per_pair=1, size=32, train_shards=2)
    out = tmp_path_factory.mktemp("dr") / "dr"
    captioner = str(tiny_model_dirs["captioner"])
    reinforce(str(root), [str(tiny_model_dirs["teacher_a"])], out, _config(),
              captioners=[f"{captioner}:coca", f"{captioner}:other"], progress=False)
    return out


def test_each_captioner_writes_its_own_caption_set_in_apples_newer_layout(two_sets):
    raw = next(iter_raw_samples([str(two_sets / "00000.tar")]))
    assert list(json.loads(raw["syn.json"])) == ["syn_text_coca", "syn_text_other"]
    arrays = read_arrays("npz", raw["npz"])
    assert arrays["text_emb"].shape == (1, 128) and arrays["syn_text_coca_emb"].shape == (2, 128)
    assert arrays["syn_text_other_emb_scale"].shape == (2, 1)  # int8: each set with its own per-row scales
    sample = next(iter(open_reinforced(two_sets)))
    assert sample["caption_sets"] == {"syn_text_coca": 2, "syn_text_other": 2}
    assert len(sample["syn_captions"]) == 4 and sample["text_emb"].shape == (5, 128)
    summary = inspect_reinforced(two_sets)
    assert summary["num_captions"] == 4
    assert summary["caption_sets"] == [{"key": "syn_text_coca", "captions": 2},
                                       {"key": "syn_text_other", "captions": 2}]


def test_captioner_tags_are_parsed_and_bad_ones_refused(tmp_path, tiny_model_dirs):
    assert parse_captioner("local-dir:/m/coca:coco") == ("local-dir:/m/coca", "coco")
    assert parse_captioner("hf-hub:org/coca") == ("hf-hub:org/coca", None)
    assert parse_captioner("coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k:coco")[1] == "coco"
    root = write_shapes_root(tmp_path / "shapes", per_pair=1, size=32)
    captioner = str(tiny_model_dirs["captioner"])
    for captioners, message in (([captioner, captioner], "give each a tag"),
                                ([f"{captioner}:a", f"{captioner}:a"], "used twice")):
        with pytest.raises(UserInputError, match=message):
            reinforce(str(root), [str(tiny_model_dirs["teacher_a"])], tmp_path / "dr", _config(),
                      captioners=captioners, progress=False)
    assert not (tmp_path / "dr").exists()


def test_reinforce_compile_decodes_with_the_compiled_step_and_records_it(tmp_path, tiny_model_dirs, capsys):
    root = write_shapes_root(tmp_path / "shapes", per_pair=1, size=32, train_shards=2)
    out = tmp_path / "dr"
    assert main(["reinforce", "--data", str(root), "--teacher", str(tiny_model_dirs["teacher_a"]), "--captioner",
                 str(tiny_model_dirs["captioner"]), "--num-augs", "1", "--num-captions", "2", "--aug-size", "32",
                 "--num-workers", "0", "--compile", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["caption_sampling"]["compiled"] is True
    samples = list(open_reinforced(out))
    assert samples and all(len(s["syn_captions"]) == 2 and all(s["syn_captions"]) for s in samples)


def _records(dataset: Path, captions: CaptionChoice, epoch: int = 0) -> list[dict]:
    info = read_info(dataset)
    return list(ReinforcedSource(info, None, 3, "random", captions=captions)(info.shards, epoch, SkipLog()))


def test_training_draws_captions_from_the_chosen_sets_sequentially_or_mixed(two_sets):
    samples = {s["key"]: s for s in open_reinforced(two_sets)}
    for record in _records(two_sets, CaptionChoice(sets=r"^syn_text_other$")):
        sample = samples[record["key"]]
        assert record["syn_caption"] in sample["syn_captions"][2:]  # only the `other` set's
        row = sample["syn_captions"].index(record["syn_caption"], 2) + 1
        assert torch.equal(record["rows"][2], sample["text_emb"][row])
    sequential = [_records(two_sets, CaptionChoice(sets="^syn_text_coca$", sampling="sequential"), epoch)
                  for epoch in (0, 1)]
    for epoch, records in enumerate(sequential):
        assert all(r["syn_caption"] == samples[r["key"]]["syn_captions"][epoch] for r in records)
    mixed = _records(two_sets, CaptionChoice(mix_synthetic=True, mix_ratio=1.0))
    assert all(r["syn_caption"] == "" and r["caption"] in samples[r["key"]]["syn_captions"] for r in mixed)
    assert all(not r["rows"][2].any() for r in mixed)  # no second caption, so no synthetic loss term
    real = _records(two_sets, CaptionChoice(mix_synthetic=True, mix_ratio=0.0))
    assert all(r["caption"] is None and torch.equal(r["rows"][1], samples[r["key"]]["text_emb"][0]) for r in real)


def _members(directory: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            out.update({f"{path.name}/{m.name}": tar.extractfile(m).read() for m in tar.getmembers()})
    return out


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def one_set(tmp_path, tiny_model_dirs) -> Path:
    root = write_shapes_root(tmp_path / "shapes", per_pair=1, size=32, train_shards=2)
    out = tmp_path / "dr"
    reinforce(str(root), [str(tiny_model_dirs["teacher_a"])], out, _config(),
              captioners=[str(tiny_model_dirs["captioner"])], progress=False)  # untagged: the `syn_text` set
    return out


def test_adding_a_captioner_and_a_teacher_keeps_every_stored_value(one_set, tiny_model_dirs):
    before = {s["key"]: s for s in open_reinforced(one_set)}
    captioner = str(tiny_model_dirs["captioner"])
    extend_reinforced(one_set, captioner=f"{captioner}:second", num_captions=3, progress=False)
    middle = {s["key"]: s for s in open_reinforced(one_set)}
    for key, sample in middle.items():
        old = before[key]
        assert sample["caption_sets"] == {"syn_text": 2, "syn_text_second": 3}
        assert sample["syn_captions"][:2] == old["syn_captions"]
        assert torch.equal(sample["image_emb"], old["image_emb"]) and torch.equal(sample["text_emb"][:3],
                                                                                   old["text_emb"])
    teacher = str(tiny_model_dirs["teacher_b"])  # another tokenizer-free width: md-student-tiny, 128-d
    config = extend_reinforced(one_set, teacher=teacher, progress=False)
    assert [t["dim"] for t in config["teachers"]] == [128, 128] and len(config["extensions"]) == 2
    after = {s["key"]: s for s in open_reinforced(one_set)}
    for key, sample in after.items():
        old = middle[key]
        assert sample["image_emb"].shape == (2, 256) and torch.equal(sample["image_emb"][:, :128], old["image_emb"])
        assert torch.equal(sample["text_emb"][:, :128], old["text_emb"]) and sample["syn_captions"] == \
            old["syn_captions"]
        norms = sample["text_emb"][:, 128:].norm(dim=1)  # the new teacher's columns: its own normalized space
        assert torch.allclose(norms, torch.ones_like(norms), atol=2e-2)
    assert not (one_set / "extend_run.json").exists() and not list(one_set.glob(".*"))


def test_bad_additions_are_one_line_and_change_nothing(one_set, tiny_model_dirs, tmp_path, capsys):
    captioner, teacher = str(tiny_model_dirs["captioner"]), str(tiny_model_dirs["teacher_a"])
    extend_reinforced(one_set, captioner=f"{captioner}:dup", num_captions=1, progress=False)
    before = _digest(one_set)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "reinforce_run.json").write_text("{}")
    cases = [
        (["--add-to", str(one_set), "--captioner", f"{captioner}:dup"], None, "pick another tag"),
        (["--add-to", str(one_set), "--captioner", captioner], None, "needs a tag"),
        (["--add-to", str(one_set), "--captioner", f"{teacher}:x"], None, "not a captioner"),
        (["--add-to", str(one_set), "--teacher", teacher], None, "already in the dataset"),
        (["--add-to", str(tmp_path / "unfinished"), "--teacher", teacher], None, "unfinished"),
        (["--add-to", str(tmp_path), "--teacher", teacher], None, "not a reinforced dataset"),
        (["--add-to", str(one_set), "--teacher", teacher, "--captioner", f"{captioner}:x"], None, "at a time"),
    ]
    for argv, _, message in cases:
        code = main(["reinforce", *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (argv, err)
    assert _digest(one_set) == before


def test_a_killed_addition_resumes_to_the_uninterrupted_result(one_set, tiny_model_dirs, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    shutil.copytree(one_set, reference)
    captioner = f"{tiny_model_dirs['captioner']}:late"
    extend_reinforced(reference, captioner=captioner, num_captions=2, progress=False)

    written = []
    original = extend._write_extended

    def killed_after_one(*args, **kwargs):
        if written:
            raise KeyboardInterrupt  # as a kill between two shards
        written.append(original(*args, **kwargs))

    monkeypatch.setattr(extend, "_write_extended", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        extend_reinforced(one_set, captioner=captioner, num_captions=2, progress=False)
    assert (one_set / "extend_run.json").is_file() and list(one_set.glob(".*.extended"))
    with pytest.raises(UserInputError, match="being extended"):
        read_info(one_set)
    monkeypatch.setattr(extend, "_write_extended", original)
    extend_reinforced(one_set, captioner=captioner, num_captions=2, progress=False)
    assert _members(one_set) == _members(reference)
    config, ref_config = (json.loads((d / "config.json").read_text()) for d in (one_set, reference))
    assert config["caption_sets"] == ref_config["caption_sets"]
    np.testing.assert_equal(config["counts"]["bytes"], ref_config["counts"]["bytes"])
