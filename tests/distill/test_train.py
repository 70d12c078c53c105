import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

from distill.recipe import DistillConfig, load_recipe
from distill.teacher_training import TeacherTrainConfig, load_teacher_recipe
from distill.train import distill
from mdcore.errors import UserInputError
from mobiledistill.quickstart import load_quickstart_recipe, shipped_recipe
from reinforced_data.augment import AugmentationConfig
from teachers.reinforce import ReinforceConfig, reinforce
from tests.conftest import write_shapes_root

REPO = Path(__file__).parents[2]


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_says_what_it_is_for(recipe):
    """Distillation recipes, teacher-training recipes (`*-teacher*.yaml`) and the quickstart's, each by its loader."""
    if recipe.name == "quickstart.yaml":
        full, fast = load_quickstart_recipe(recipe), load_quickstart_recipe(recipe, fast=True)
        assert full.limit is None and fast.limit and fast.distill_steps < full.distill_steps
        assert load_teacher_recipe(shipped_recipe(full.teacher_recipe)).steps > 0
    elif "-teacher" in recipe.stem:
        config = load_teacher_recipe(recipe)
        assert isinstance(config, TeacherTrainConfig) and config.steps > 0
    else:
        config = load_recipe(recipe)
        assert isinstance(config, DistillConfig) and config.steps > 0
    assert recipe.read_text().startswith("#")  # a header comment: what it is for, how long it runs


def test_recipes_name_their_keys_and_types(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# a typo\nstpes: 10\n")
    with pytest.raises(UserInputError, match="unknown recipe key 'stpes'"):
        load_teacher_recipe(bad)
    bad.write_text("# a wrong type\nsteps: many\n")
    with pytest.raises(UserInputError, match="steps"):
        load_teacher_recipe(bad)
    assert load_teacher_recipe(None, ["steps=7", "lr=3e-4"]).lr == pytest.approx(3e-4)
    quick = tmp_path / "quick.yaml"
    quick.write_text((REPO / "recipes" / "quickstart.yaml").read_text().replace("bench_runs: 50", "bench_run: 50"))
    with pytest.raises(UserInputError, match="unknown quickstart keys: bench_run; missing quickstart keys: bench_runs"):
        load_quickstart_recipe(quick)


@pytest.fixture(scope="module")
def reinforced(tmp_path_factory, tiny_model_dirs) -> Path:
    root = write_shapes_root(tmp_path_factory.mktemp("data") / "shapes", per_pair=3, size=64, train_shards=2)
    out = tmp_path_factory.mktemp("dr") / "dr"
    reinforce(str(root), [str(tiny_model_dirs["teacher_a"]), str(tiny_model_dirs["teacher_b"])], out,
              ReinforceConfig(num_augs=2, num_captions=1, dtype="fp16",
                              augmentation=AugmentationConfig(size=64, scale=(0.5, 1.0))),
              captioners=[str(tiny_model_dirs["captioner"])], progress=False)
    return out


def test_distill_with_inheritance_writes_a_model_directory(reinforced, tiny_model_dirs, tmp_path):
    config = load_recipe(REPO / "recipes" / "emoji-kd-affinity.yaml",
                         ["steps=4", "batch_size=8", "warmup_steps=1", "log_every=1",
                          f"inherit_from={tiny_model_dirs['teacher_a']}"])
    run = tmp_path / "run"
    summary = distill(str(reinforced), run, config, progress=False)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert {"kd_real_loss", "kd_syn_loss", "clip_real_loss", "clip_syn_loss", "affinity_loss"} <= set(rows[0])
    assert (run / "curves.png").stat().st_size > 0 and (run / "recipe.yaml").is_file()
    provenance = json.loads((run / "mobiledistill.json").read_text())
    assert provenance["inheritance"]["sliced"] > 0 and provenance["evaluation"]["num_samples"] > 0
    assert summary["evaluation"]["zeroshot"]["num_classes"] == 3
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run}")  # plain open_clip loads the run
    assert model.visual.transformer.width == 128
    with pytest.raises(UserInputError, match="finished run"):
        distill(str(reinforced), run, config, progress=False)


def test_bad_recipe_and_dimension_mismatch(reinforced, tmp_path):
    with pytest.raises(UserInputError, match="unknown recipe key"):
        load_recipe(None, ["loss.w_kdd=1"])
    assert load_recipe(None, ["lr=3e-4"]).lr == 3e-4  # YAML reads 3e-4 as a string
    with pytest.raises(UserInputError, match="takes float"):
        load_recipe(None, ["lr=fast"])
    config_path = reinforced / "config.json"
    original = config_path.read_text()
    config = json.loads(original)
    config["teachers"][0]["dim"] = 64
    config_path.write_text(json.dumps(config))
    try:
        with pytest.raises(UserInputError, match="embedding dimension 256 is not the teachers' 192"):
            distill(str(reinforced), tmp_path / "run", load_recipe(None, ["steps=1"]), progress=False)
    finally:
        config_path.write_text(original)


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_online_teachers_give_the_losses_of_their_stored_embeddings(reinforced, tiny_model_dirs, tmp_path):
    # The same teachers in the loop see the very views and captions the dataset stored embeddings of.
    overrides = ["steps=3", "batch_size=8", "warmup_steps=1", "log_every=1", "loss.w_clip=1.0"]
    distill(str(reinforced), tmp_path / "stored", load_recipe(None, overrides), progress=False)
    online = load_recipe(None, overrides)
    online.online_teachers = [str(tiny_model_dirs["teacher_a"]), str(tiny_model_dirs["teacher_b"])]
    distill(str(reinforced), tmp_path / "online", online, progress=False)
    stored_rows, online_rows = _losses(tmp_path / "stored"), _losses(tmp_path / "online")
    assert len(stored_rows) == len(online_rows) == 3
    for a, b in zip(stored_rows, online_rows):
        for key in ("kd_real_loss", "kd_syn_loss", "clip_real_loss"):
            assert a[key] == pytest.approx(b[key], rel=2e-3), (a["step"], key)  # fp16 storage rounding
    assert json.loads((tmp_path / "online" / "mobiledistill.json").read_text())["online_teachers"] is True


def test_online_teacher_trains_from_plain_image_text_shards(tiny_model_dirs, tmp_path):
    root = write_shapes_root(tmp_path / "shapes", per_pair=2, size=48, train_shards=2, bad=True)
    config = load_recipe(None, ["steps=2", "batch_size=6", "warmup_steps=1", "log_every=1"])
    config.online_teachers = [str(tiny_model_dirs["teacher_a"])]
    summary = distill(str(root), tmp_path / "run", config, progress=False)
    rows = _losses(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1] and "kd_syn_loss" not in rows[0]
    assert summary["skipped_samples"] > 0  # the undecodable image in the shards
    assert summary["evaluation"]["zeroshot"]["num_classes"] == 3
    with pytest.raises(UserInputError, match="image-text|config.json|teachers"):  # no teacher: not reinforced
        distill(str(root), tmp_path / "plain", load_recipe(None, ["steps=1"]), progress=False)


@pytest.mark.slow
def test_two_processes_with_workers_resume_with_the_losses_of_an_uninterrupted_run(tmp_path, tiny_model_dirs):
    """Two processes of one data worker each on three shards (uneven between them): a run stopped after its
    step-3 checkpoint and resumed gives the uninterrupted run's losses, data order included."""
    root = write_shapes_root(tmp_path / "shapes", per_pair=3, size=32, train_shards=3)
    data = tmp_path / "dr"
    reinforce(str(root), [str(tiny_model_dirs["teacher_a"])], data,
              ReinforceConfig(num_augs=2, num_captions=0, augmentation=AugmentationConfig(size=32), num_workers=0),
              progress=False)
    common = ["distill", "--data", str(data), "--student", "md-student-tiny", "--steps", "6", "--batch-size", "8",
              "--save-every", "3", "--num-workers", "1", "log_every=1", "warmup_steps=1", "loss.w_clip=1.0",
              "loss.w_affinity=1.0", "shuffle_buffer=8"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "distill"]
    reference = subprocess.run([*launch, *common, "--out", str(tmp_path / "ref")], cwd=REPO, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", run)
    (run / "open_clip_config.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step_6")  # as if stopped right after step 3's checkpoint
    resumed = subprocess.run([*launch, *common, "--out", str(run), "--resume"], cwd=REPO, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows_ref, rows = _losses(tmp_path / "ref"), _losses(run)
    assert [r["step"] for r in rows] == [r["step"] for r in rows_ref] == list(range(6))
    for a, b in zip(rows_ref, rows):
        for key in ("loss", "lr", "kd_real_loss", "clip_real_loss", "affinity_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    provenance = json.loads((run / "mobiledistill.json").read_text())
    assert provenance["train"]["resumed_from"] == 3 and len(provenance["train"]["data"]["bytes_read_per_process"]) == 2


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "distill", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_losses(reinforced, tmp_path):
    common = ["distill", "--data", str(reinforced), "--student", "md-student-tiny", "--steps", "12",
              "--batch-size", "8", "--save-every", "3", "--num-workers", "2", "log_every=1", "warmup_steps=2"]
    reference = _cli([*common, "--out", str(tmp_path / "ref")])
    assert reference.wait(timeout=600) == 0, reference.stderr.read()
    run = tmp_path / "killed"
    proc = _cli([*common, "--out", str(run)])
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_3" / "step.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "open_clip_config.json").exists()
    resumed = _cli([*common, "--out", str(run), "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(12))
    for a, b in zip(rows, ref_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), a["step"]


def test_a_pretrained_hugging_face_text_tower_is_locked_and_cached(reinforced, tmp_path):
    """md-student-minilm's all-MiniLM-L6-v2 tower stays as it was (LiT, only its projection trains); the feature
    and affinity terms follow the teacher `loss.reference_teacher` names."""
    from safetensors.torch import load_file

    config = load_recipe(None, ["student=md-student-minilm", "steps=3", "batch_size=8", "warmup_steps=1",
                                "log_every=1", "loss.w_feature=10", "loss.w_affinity=1", "loss.reference_teacher=1"])
    run = tmp_path / "run"
    distill(str(reinforced), run, config, progress=False)
    reference = open_clip.create_model("md-student-minilm").state_dict()
    trained = load_file(str(run / "open_clip_model.safetensors"))
    transformer = [k for k in trained if k.startswith("text.transformer.")]
    assert transformer and all(torch.equal(trained[k], reference[k]) for k in transformer)
    provenance = json.loads((run / "mobiledistill.json").read_text())
    assert provenance["text_locked"] is True
    assert {"feature_loss", "affinity_loss"} <= set(_losses(run)[0])
    with pytest.raises(UserInputError, match="reference_teacher"):
        distill(str(reinforced), tmp_path / "bad", load_recipe(None, ["steps=1", "batch_size=8",
                                                                      "loss.reference_teacher=2"]), progress=False)
