import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from distill.losses import ensemble_kd_loss
from mdcore.errors import UserInputError
from mobiledistill.cli import main
from reinforced_data.augment import AugmentationConfig, replay_augmentation
from reinforced_data.reader import open_reinforced, read_info
from reinforced_data.storage import decode_embeddings, encode_embeddings
from teachers.reinforce import ReinforceConfig, reinforce
from teachers.teacher import TeacherEnsemble
from tests.conftest import draw_shape, png_bytes, write_shapes_root

REPO = Path(__file__).parents[2]


def _config(**kwargs) -> ReinforceConfig:
    defaults = dict(num_augs=3, num_captions=2, dtype="fp32", seed=7, batch_size=12,
                    augmentation=AugmentationConfig(size=32, scale=(0.3, 1.0)))
    defaults.update(kwargs)
    return ReinforceConfig(**defaults)


def _members(out_dir: Path) -> dict[str, bytes]:
    """Every member of every output shard, by name (tar headers aside)."""
    members = {}
    for tar_path in sorted(out_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                members[f"{tar_path.name}/{m.name}"] = tar.extractfile(m).read()
    return members


@pytest.fixture
def data(tmp_path) -> Path:
    return write_shapes_root(tmp_path / "shapes", per_pair=2, train_shards=3, bad=True)


def test_replay_gives_the_very_tensor_the_teachers_saw(data, tiny_model_dirs, tmp_path, monkeypatch):
    seen = []
    original = TeacherEnsemble.encode_image_tensors

    def spy(self, images):
        seen.append(images.clone())
        return original(self, images)

    monkeypatch.setattr(TeacherEnsemble, "encode_image_tensors", spy)
    config = _config(num_captions=0)
    reinforce(str(data), [str(tiny_model_dirs["teacher_a"])], tmp_path / "dr", config, progress=False)
    views = torch.cat(seen)  # (N * K, 3, S, S) in write order
    samples = list(open_reinforced(tmp_path / "dr"))
    assert len(samples) * 3 == len(views)
    info = read_info(tmp_path / "dr")
    for n, sample in enumerate(samples):
        assert len(sample["param_aug"]) == 3
        for k, params in enumerate(sample["param_aug"]):
            replayed = replay_augmentation(sample["image"], params, info.augmentation)
            assert torch.equal(replayed, views[n * 3 + k])


def test_same_dataset_whatever_the_batch_size_and_worker_count(data, tiny_model_dirs, tmp_path):
    teachers = [str(tiny_model_dirs["teacher_a"]), str(tiny_model_dirs["teacher_b"])]
    captioners = [str(tiny_model_dirs["captioner"])]
    reinforce(str(data), teachers, tmp_path / "a", _config(batch_size=3, num_workers=0), captioners=captioners,
              progress=False)
    reinforce(str(data), teachers, tmp_path / "b", _config(batch_size=64, num_workers=2), captioners=captioners,
              progress=False)
    a, b = _members(tmp_path / "a"), _members(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        if name.endswith(".npz"):  # float results of different batch shapes: equal to rounding
            ea, eb = decode_embeddings("npz", a[name]), decode_embeddings("npz", b[name])
            assert all(np.allclose(x, y, atol=1e-5) for x, y in zip(ea, eb)), name
        else:
            assert a[name] == b[name], name


def test_config_skips_and_layout(data, tiny_model_dirs, tmp_path):
    broken = data / "train" / "1.tar"
    broken.write_bytes(broken.read_bytes()[:700])  # a shard cut off mid-member
    config = reinforce(str(data), [str(tiny_model_dirs["teacher_a"]), str(tiny_model_dirs["teacher_b"])],
                       tmp_path / "dr", _config(dtype="fp16"), captioners=[str(tiny_model_dirs["captioner"])],
                       progress=False)
    out = tmp_path / "dr"
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert not list(out.glob(".*tmp*")) and not (out / "reinforce_run.json").exists()
    reasons = {s["key"]: s["reason"] for s in config["skipped"]}
    assert reasons["no-caption"] == "no caption" and reasons["no-image"] == "no image"
    assert reasons["empty-caption"] == "empty caption" and reasons["bad-image"].startswith("undecodable")
    assert any(k.endswith("1.tar") and r.startswith("unreadable") for k, r in reasons.items())
    assert config["counts"]["samples"] == len(list(open_reinforced(out))) > 0
    assert [t["dim"] for t in config["teachers"]] == [128, 128]
    assert all(t["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-3) for t in config["teachers"])
    assert config["num_samples"] == 3 and config["reinforce"]["image_augmentation"]["random_resized_crop"]["size"] == 32
    sample = next(iter(open_reinforced(out)))
    assert sample["image_emb"].shape == (3, 256) and sample["text_emb"].shape == (3, 256)
    assert len(sample["syn_captions"]) == 2 and sample["caption"].startswith("a ")
    for part in (sample["image_emb"][:, :128], sample["image_emb"][:, 128:]):  # each teacher normalized alone
        assert torch.allclose(part.norm(dim=-1), torch.ones(3), atol=2e-3)
    with pytest.raises(UserInputError, match="already a finished"):
        reinforce(str(data), [str(tiny_model_dirs["teacher_a"])], out, _config(num_captions=0), progress=False)


def test_unsafe_keys_are_never_written(tmp_path, tiny_model_dirs):
    shards = tmp_path / "in"
    shards.mkdir()
    with tarfile.open(shards / "0.tar", "w") as tar:
        for name, data in (("../escape.png", png_bytes(draw_shape("red", "circle"))), ("../escape.txt", b"evil"),
                           ("ok.png", png_bytes(draw_shape("blue", "square"))), ("ok.txt", b"a blue square.")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    config = reinforce(str(shards), [str(tiny_model_dirs["teacher_a"])], tmp_path / "out", _config(num_captions=0),
                       progress=False)
    assert config["counts"]["samples"] == 1
    assert any(s["reason"].startswith("unsafe key") for s in config["skipped"])
    assert all(".." not in name for name in _members(tmp_path / "out"))
    assert not (tmp_path / "escape.png").exists()


def test_int8_is_small_and_keeps_the_kd_loss(tiny_model_dirs):
    rng = np.random.default_rng(0)
    dims = [384, 256]

    def normalized(n):
        parts = [rng.standard_normal((n, d)).astype(np.float32) for d in dims]
        return np.concatenate([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts], axis=1)

    image, text = normalized(10), normalized(6)  # K=10 views, 1 + C=5 captions
    _, fp32 = encode_embeddings(image, text, "fp32", dims)
    _, int8 = encode_embeddings(image, text, "int8", dims)
    assert len(int8) <= 0.30 * len(fp32)
    image_q, text_q = decode_embeddings("npz", int8, dims)
    assert np.abs(image_q - image).max() < 0.01 and np.abs(text_q - text).max() < 0.01

    # The KD loss from dequantized teacher embeddings is within 1% of the fp32 one.
    batch = 64
    t_image, t_text = torch.from_numpy(normalized(batch)), torch.from_numpy(normalized(batch))
    _, blob = encode_embeddings(t_image.numpy(), t_text.numpy(), "int8", dims)
    q_image, q_text = (torch.from_numpy(x) for x in decode_embeddings("npz", blob, dims))
    student_i = torch.nn.functional.normalize(t_image[:, :256] + 0.5 * torch.randn(batch, 256), dim=-1)
    student_t = torch.nn.functional.normalize(t_text[:, :256] + 0.5 * torch.randn(batch, 256), dim=-1)

    def kd(image_emb, text_emb):
        return ensemble_kd_loss(student_i, student_t, 20.0, list(image_emb.split(dims, dim=1)),
                                list(text_emb.split(dims, dim=1)), [100.0, 50.0])

    exact, quantized = kd(t_image, t_text), kd(q_image, q_text)
    assert abs(quantized - exact) / exact < 0.01


def test_reads_apple_datacompdr_layout_joined_with_image_shards(tmp_path):
    """A sample as Apple released them: npz (fp32), paug.json (param_aug a JSON string), syn.json, json; no image."""
    dr, images = tmp_path / "dr", tmp_path / "images"
    dr.mkdir()
    images.mkdir()
    image_emb = np.random.default_rng(1).standard_normal((2, 1536)).astype(np.float32)
    text_emb = np.random.default_rng(2).standard_normal((3, 1536)).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, image_emb=image_emb, text_emb=text_emb)
    params = [[[1, 2, 20, 24], [[0, 0.0], [6, 0.27]]], [[0, 0, 32, 32], [[11, 178.5], [5, -9.0]]]]
    with wds.TarWriter(str(dr / "00000000.tar")) as sink:
        sink.write({"__key__": "000000001", "url.txt": "http://example.com/cat.jpg", "npz": buffer.getvalue(),
                    "paug.json": json.dumps({"param_aug": json.dumps(params)}),
                    "syn.json": json.dumps({"syn_text": ["a red circle", "a round red thing"]}),
                    "json": json.dumps({"uid": "000000001", "sha256": "0" * 64})})
    (dr / "config.json").write_text(json.dumps({
        "model_name": "ViT-L-14,ViT-L-14", "pretrained": "openai,datacomp_xl_s13b_b90k", "num_samples": 2,
        "reinforce": {"image_augmentation": {"normalize": {"mean": [0.48, 0.45, 0.4], "std": [0.26, 0.26, 0.27]},
                                             "rand_augment": {"enable": True, "p": 1.0},
                                             "random_resized_crop": {"interpolation": "bicubic", "size": 32},
                                             "to_rgb": {"enable": True}, "to_tensor": {"enable": True}}}}))
    with wds.TarWriter(str(images / "00000000.tar")) as sink:
        sink.write({"__key__": "000000001", "jpg": png_bytes(draw_shape("red", "circle")), "txt": "a red circle."})
    (sample,) = list(open_reinforced(dr, images=images))
    assert sample["caption"] == "a red circle." and sample["image"].size == (32, 32)
    assert sample["param_aug"] == params and sample["syn_captions"] == ["a red circle", "a round red thing"]
    assert torch.equal(sample["image_emb"], torch.from_numpy(image_emb))
    info = read_info(dr)
    assert info.format == "datacompdr" and [t["spec"] for t in info.teachers] == [
        "ViT-L-14@openai", "ViT-L-14@datacomp_xl_s13b_b90k"]
    assert info.augmentation.size == 32 and info.augmentation.num_ops == 2 and info.augmentation.magnitude == 9
    view = replay_augmentation(sample["image"], sample["param_aug"][1], info.augmentation)
    assert view.shape == (3, 32, 32)
    from reinforced_data.inspection import inspect_reinforced

    summary = inspect_reinforced(dr)
    assert summary["format"] == "datacompdr" and summary["num_augs"] == 2 and summary["num_captions"] == 2
    assert summary["dtype"] == "fp32" and [t["dim"] for t in summary["teachers"]] == [768, 768]


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _reinforce_args(data: Path, dirs: dict, out: Path) -> list[str]:
    return ["reinforce", "--data", str(data), "--teacher", str(dirs["teacher_a"]), "--teacher",
            str(dirs["teacher_b"]), "--captioner", str(dirs["captioner"]), "--num-augs", "2", "--num-captions", "1",
            "--dtype", "int8", "--aug-size", "32", "--seed", "3", "--out", str(out)]


@pytest.mark.slow
def test_two_processes_write_the_same_dataset_as_one(data, tiny_model_dirs, tmp_path):
    def args(out):
        return _reinforce_args(data, tiny_model_dirs, out)

    one = _cli([sys.executable, "-m", "distill", *args(tmp_path / "one")])
    assert one.wait(timeout=600) == 0, one.stderr.read()
    two = _cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "distill", *args(tmp_path / "two")])
    assert two.wait(timeout=600) == 0, two.stderr.read()
    a, b = _members(tmp_path / "one"), _members(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        if name.endswith(".npz"):
            ea, eb = decode_embeddings("npz", a[name], [128, 128]), decode_embeddings("npz", b[name], [128, 128])
            assert all(np.allclose(x, y, atol=2e-2) for x, y in zip(ea, eb)), name
        else:
            assert a[name] == b[name], name
    config_one = json.loads((tmp_path / "one" / "config.json").read_text())
    config_two = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config_one["counts"]["samples"] == config_two["counts"]["samples"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_dataset(tiny_model_dirs, tmp_path):
    data = write_shapes_root(tmp_path / "shapes", per_pair=3, train_shards=6)
    reference = _cli([sys.executable, "-m", "distill", *_reinforce_args(data, tiny_model_dirs, tmp_path / "ref")])
    assert reference.wait(timeout=600) == 0, reference.stderr.read()

    out = tmp_path / "killed"
    run = _cli([sys.executable, "-m", "distill", *_reinforce_args(data, tiny_model_dirs, out)])
    deadline = time.time() + 300
    while not list(out.glob("0000[0-9].tar")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    run.send_signal(signal.SIGKILL)
    run.wait()
    finished_before = sorted(p.name for p in out.glob("*.tar"))
    assert not (out / "config.json").exists() and len(finished_before) < 6
    rerun = _cli([sys.executable, "-m", "distill", *_reinforce_args(data, tiny_model_dirs, out)])
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    assert not list(out.glob(".*"))  # the killed run's temporaries removed by the run that took over
    assert _members(out) == _members(tmp_path / "ref")


def test_a_second_run_on_a_directory_in_use_is_refused_and_the_first_completes(tiny_model_dirs, tmp_path, capsys):
    data = write_shapes_root(tmp_path / "shapes", per_pair=3, train_shards=4)
    out = tmp_path / "dr"
    args = _reinforce_args(data, tiny_model_dirs, out)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mdcore.locks import hold_directory\n"
                               f"with hold_directory({str(out)!r}):\n print('held', flush=True); time.sleep(600)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)  # as another run would
    assert holder.stdout.readline().strip() == "held"
    assert main(args) == 2
    assert f"in use by another run (process {holder.pid})" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [".mobiledistill.lock"]  # nothing touched
    holder.kill()
    holder.wait()
    first = _cli([sys.executable, "-m", "distill", *args])
    lock = out / ".mobiledistill.lock"
    deadline = time.time() + 300
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)) and first.poll() is None and \
            time.time() < deadline:
        time.sleep(0.01)
    assert main(args) == 2  # started while the first one runs
    err = capsys.readouterr().err
    assert "in use by another run" in err and str(first.pid) in err
    assert first.wait(timeout=600) == 0, first.stderr.read()
    config = json.loads((out / "config.json").read_text())
    assert config["counts"]["samples"] == 36 and len(list(out.glob("*.tar"))) == 4
    assert not list(out.glob(".*"))  # no temporaries, no lock file


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 1e-2), ("int8", 1e-2)])
def test_every_storage_dtype_round_trips(dtype, tolerance):
    rng = np.random.default_rng(3)
    image = rng.standard_normal((4, 96)).astype(np.float32) / 8
    text = rng.standard_normal((3, 96)).astype(np.float32) / 8
    ext, blob = encode_embeddings(image, text, dtype, [64, 32])
    assert ext == ("pth.gz" if dtype == "bf16" else "npz")
    image_back, text_back = decode_embeddings(ext, blob, [64, 32])
    assert image_back.dtype == np.float32 and image_back.shape == image.shape and text_back.shape == text.shape
    assert np.abs(image_back - image).max() <= tolerance and np.abs(text_back - text).max() <= tolerance


def test_inspect_command_prints_summary_and_writes_html(data, tiny_model_dirs, tmp_path):
    reinforce(str(data), [str(tiny_model_dirs["teacher_a"])], tmp_path / "dr", _config(num_captions=1, dtype="int8"),
              captioners=[str(tiny_model_dirs["captioner"])], progress=False)
    page = tmp_path / "page.html"
    proc = _cli([sys.executable, "-m", "distill", "inspect", str(tmp_path / "dr"), "--html", str(page),
                 "--num-samples", "3"])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["format"] == "mobiledistill" and summary["dtype"] == "int8"
    assert summary["num_augs"] == 3 and summary["num_captions"] == 1 and summary["num_samples"] > 0
    assert summary["teachers"][0]["dim"] == 128 and summary["bytes_per_sample"] > 0
    text = page.read_text()
    assert text.count("<section>") == 3 and text.count("data:image/png;base64,") == 3 * 3
    assert "src='http" not in text  # self-contained
