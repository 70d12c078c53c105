"""One bad sample never ends a run: each is skipped, counted with its reason, and the rest of its shard is read."""

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from distill.recipe import load_recipe
from distill.train import distill
from reinforced_data.reader import open_reinforced
from reinforced_data.shards import SkipLog, iter_image_text, iter_raw_samples
from tests.conftest import draw_shape, png_bytes


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _bomb_npz() -> bytes:
    """An npz whose header claims a (10^6, 10^6) float32 array: 4 TB if numpy believed it."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    header = header + " " * (63 - (10 + len(header)) % 64) + "\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 64
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("image_emb.npy", npy)
        archive.writestr("text_emb.npy", npy)
    return buffer.getvalue()


def _paug(views: list) -> bytes:
    return json.dumps({"param_aug": json.dumps(views)}).encode()


# Each corruption of a good reinforced sample (K = 2 views, C = 0 captions) and the reason it is skipped for.
CORRUPTIONS = {
    "deep-json": (lambda s: {**s, "json": b"[" * 50_000 + b"]" * 50_000}, "json is nested"),
    "syn-not-object": (lambda s: {**s, "syn.json": b'["a caption"]'}, "syn.json is not an object"),
    "syn-text-not-list": (lambda s: {**s, "syn.json": b'{"syn_text": "a caption"}'}, "syn_text is not a list"),
    "paug-not-object": (lambda s: {**s, "paug.json": b"[1, 2]"}, "paug.json is not an object"),
    "crop-negative": (lambda s: {**s, "paug.json": _paug([[[-5, 0, 10, 10], []]] * 2)}, "empty or negative"),
    "op-out-of-range": (lambda s: {**s, "paug.json": _paug([[[0, 0, 10, 10], [[99, 1.0]]]] * 2)}, "op index 99"),
    "posterize-bits": (lambda s: {**s, "paug.json": _paug([[[0, 0, 10, 10], [[10, 40.0]]]] * 2)}, "Posterize"),
    "more-views-than-rows": (lambda s: {**s, "paug.json": _paug([[[0, 0, 10, 10], []]] * 3)},
                             "3 stored augmentations but 2 image embedding rows"),
    "npz-wrong-shape": (lambda s: {**s, "npz": _npz(image_emb=np.zeros(8, np.float32),
                                                   text_emb=np.zeros((1, 8), np.float32))}, "not (rows, D)"),
    "npz-wrong-dim": (lambda s: {**s, "npz": _npz(image_emb=np.zeros((2, 7), np.float32),
                                                 text_emb=np.zeros((1, 7), np.float32))}, "embedding dimension 7"),
    "npz-not-finite": (lambda s: {**s, "npz": _npz(image_emb=np.full((2, 128), np.nan, np.float32),
                                                  text_emb=np.zeros((1, 128), np.float32))}, "not finite"),
    "npz-bomb": (lambda s: {**s, "npz": _bomb_npz()}, "claims more data than it holds"),
    "npz-object": (lambda s: {**s, "npz": b"PK not a zip"}, "unreadable npz"),
    "caption-not-utf8": (lambda s: {**s, "txt": b"\xff\xfe"}, "caption is not UTF-8"),
}
# Stored crops that fit no image are found when the view is replayed, by the consumer that has the image.
REPLAY_CORRUPTIONS = {
    "crop-outside-image": (lambda s: {**s, "paug.json": _paug([[[0, 0, 500, 500], []]] * 2)}, "outside the"),
}


def _write_tar(path: Path, samples: list[dict]) -> None:
    """Write samples member by member (a list value writes the same member several times: a duplicate)."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, value in sample.items():
                if ext.startswith("__"):
                    continue
                for data in value if isinstance(value, list) else [value]:
                    data = data if isinstance(data, bytes) else data.encode()
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def corrupted(one_teacher_reinforced, tmp_path) -> tuple[Path, dict[str, str], int]:
    """A copy of the session's reinforced dataset whose first shard interleaves each corruption with the good
    samples, plus a duplicate member; returns (dataset, expected reason per bad key, number of good samples)."""
    data = tmp_path / "dr"
    shutil.copytree(one_teacher_reinforced, data)
    shard = data / "00000.tar"
    good = list(iter_raw_samples([str(shard)]))
    samples, expected = [], {}
    for n, (name, (corrupt, reason)) in enumerate({**CORRUPTIONS, **REPLAY_CORRUPTIONS}.items()):
        bad = corrupt({k: v for k, v in good[n % len(good)].items() if not k.startswith("__")})
        samples += [good[n % len(good)] if n < len(good) else {}, {"__key__": f"bad-{name}", **bad}]
        expected[f"bad-{name}"] = reason
    source = {k: v for k, v in good[0].items() if not k.startswith("__")}
    samples.append({"__key__": "bad-duplicate", **source, "txt": [b"one caption", b"another caption"]})
    expected["bad-duplicate"] = "duplicate member: .txt"
    samples += good[len(CORRUPTIONS) + len(REPLAY_CORRUPTIONS):]  # the rest of the shard after every bad sample
    _write_tar(shard, [s for s in samples if s])
    return data, expected, len(good)


def test_every_malformed_member_is_skipped_with_its_reason(corrupted):
    data, expected, good = corrupted
    skips = SkipLog()
    keys = [s["key"] for s in open_reinforced(data, skips=skips)]
    reasons = {s["key"]: s["reason"] for s in skips.samples}
    replayed_later = {f"bad-{name}" for name in REPLAY_CORRUPTIONS}
    assert set(reasons) == set(expected) - replayed_later
    for key, reason in reasons.items():
        assert expected[key] in reason, (key, reason)
    assert sum(k.startswith("bad-") for k in keys) == len(replayed_later)  # readable, but fits no image
    total_good = sum(1 for _ in open_reinforced(data)) - len(replayed_later)
    assert total_good >= good and skips.sample_count == len(reasons)
    assert all(s["shard"].endswith("00000.tar") for s in skips.samples)


def test_distill_finishes_on_bad_samples_and_reports_them(corrupted, tmp_path):
    data, expected, _ = corrupted
    config = load_recipe(None, ["steps=6", "batch_size=8", "warmup_steps=1", "log_every=1", "shuffle_buffer=4"])
    summary = distill(str(data), tmp_path / "run", config, progress=False)
    skips = summary["skips"]
    assert skips["samples"] == len(expected), skips["summary"]
    assert {e["key"] for e in skips["examples"]} == set(expected)
    assert skips["by_shard"] == {"00000.tar": len(expected)}
    provenance = json.loads((tmp_path / "run" / "mobiledistill.json").read_text())
    assert provenance["train"]["skips"]["samples"] == len(expected)


def test_image_text_members_of_the_wrong_type_are_skipped(tmp_path, monkeypatch):
    image = png_bytes(draw_shape("red", "circle"))
    samples = [
        {"__key__": "ok", "png": image, "txt": "a red circle."},
        {"__key__": "meta-list", "png": image, "txt": "x", "json": "[1]"},
        {"__key__": "captions-int", "png": image, "txt": "x", "json": '{"captions": 5}'},
        {"__key__": "deep", "png": image, "txt": "x", "json": "[" * 40_000 + "]" * 40_000},
        {"__key__": "huge", "png": png_bytes(draw_shape("red", "circle", size=64)), "txt": "x"},
        {"__key__": "dup", "png": [image, image], "txt": "x"},
        {"__key__": "ok2", "png": image, "txt": "a red circle."},
    ]
    _write_tar(tmp_path / "0.tar", samples)
    from reinforced_data import shards

    monkeypatch.setattr(shards, "MAX_IMAGE_PIXELS", 32 * 32)  # the 32-px pictures pass, the 64-px one is "huge"
    skips = SkipLog()
    keys = [s.key for s in iter_image_text([str(tmp_path / "0.tar")], skips)]
    assert keys == ["ok", "ok2"]  # the shard goes on after its bad samples
    reasons = {s["key"]: s["reason"] for s in skips.samples}
    assert reasons["meta-list"] == "json is not an object"
    assert reasons["captions-int"] == "json captions is not a list of captions"
    assert reasons["deep"].startswith("json is nested")
    assert reasons["dup"] == "duplicate member: .png"
    assert reasons["huge"] == "image too large: 64 x 64 pixels"
