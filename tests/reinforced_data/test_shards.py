import tarfile

import pytest

from mdcore.errors import UserInputError
from reinforced_data.shards import SkipLog, iter_image_text, resolve_shards


def test_resolve_dataset_root_split_directory_file_and_pattern(shapes_root):
    assert resolve_shards(shapes_root, "train") == [str(shapes_root / "train" / "0.tar")]
    assert resolve_shards(shapes_root / "test") == [str(shapes_root / "test" / "0.tar")]
    assert resolve_shards(shapes_root / "test" / "0.tar") == [str(shapes_root / "test" / "0.tar")]
    assert resolve_shards(str(shapes_root / "{train,test}" / "0.tar")) == [
        str(shapes_root / "train" / "0.tar"), str(shapes_root / "test" / "0.tar")]


@pytest.mark.parametrize("make", ["missing", "empty", "pattern", "split", "notatar"])
def test_resolve_bad_paths_are_user_errors(tmp_path, shapes_root, make):
    (tmp_path / "empty").mkdir()
    data = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "pattern": str(tmp_path / "{0..3}.tar"),
            "split": shapes_root, "notatar": tmp_path / "x.tar"}[make]
    (tmp_path / "x.tar").write_text("plain text")
    with pytest.raises(UserInputError):
        resolve_shards(data, "validation" if make == "split" else None)


def test_bad_samples_are_skipped_with_reasons(shapes_root):
    skips = SkipLog()
    samples = list(iter_image_text(resolve_shards(shapes_root, "train"), skips))
    assert len(samples) == 4 * 3 * 3
    reasons = {s["key"]: s["reason"] for s in skips.samples}
    assert reasons["bad-image"].startswith("undecodable image")
    assert reasons["no-caption"] == "no caption"
    assert reasons["empty-caption"] == "empty caption"
    assert reasons["no-image"] == "no image"
    assert all(s.image.mode == "RGB" and s.label in (0, 1, 2) for s in samples)


def test_unreadable_shard_is_recorded_and_others_complete(shapes_root, tmp_path):
    broken = tmp_path / "broken.tar"
    good = shapes_root / "test" / "0.tar"
    broken.write_bytes(good.read_bytes()[:1500])  # truncated mid-member
    skips = SkipLog()
    samples = list(iter_image_text([str(broken), str(good)], skips))
    assert len(skips.shards) == 1 and skips.shards[0]["shard"] == str(broken)
    with tarfile.open(good) as tar:
        assert len(samples) >= len({m.name.split(".")[0] for m in tar.getmembers()})
