import json
import tarfile
from collections import defaultdict

import PIL.Image
import pytest

from reinforced_data import emoji as emoji_mod
from reinforced_data.emoji import (
    build_emoji_dataset,
    caption_for,
    captions_for,
    classname,
    load_emoji_records,
    split_records,
)
from reinforced_data.shards import iter_image_text, resolve_shards


@pytest.fixture(scope="module")
def records():
    kept, dropped = load_emoji_records()
    return kept


def test_records_cover_what_openmoji_draws(records):
    assert len(records) > 3000
    assert len({r.codepoints for r in records}) == len(records)
    assert len({r.subgroup for r in records}) > 90
    detective = [r for r in records if r.name == "detective: dark skin tone"]
    assert detective and detective[0].base == "1F575"


def test_split_keeps_skin_tone_variants_together_and_holds_out_about_15_percent(records):
    train, test = split_records(records)
    train_bases, test_bases = {r.base for r in train}, {r.base for r in test}
    assert not train_bases & test_bases
    assert len(train) + len(test) == len(records)
    fraction = len(test_bases) / len(train_bases | test_bases)
    assert 0.10 < fraction < 0.20
    assert {r.subgroup for r in test} <= {r.subgroup for r in train}  # every test class is trained on
    assert split_records(records) == (train, test)  # deterministic
    assert split_records(records, seed=1) != (train, test)
    tones = defaultdict(set)
    for side, rs in (("train", train), ("test", test)):
        for r in rs:
            tones[r.base].add(side)
    assert all(len(sides) == 1 for sides in tones.values())


def test_captions_are_natural_and_varied(records):
    for r in records[::50]:
        captions = captions_for(r)
        assert len(set(captions)) == len(captions) >= 4
        for c in captions:
            assert c.endswith(".") and "  " not in c and c == c.strip()
            assert ": " not in c.split(":", 1)[-1] or c.count(":") == 1
        name_words = r.name.replace(":", " ").replace(",", " ").split()
        assert all(w in captions[0] for w in name_words[:2])
    flag = next(r for r in records if r.name == "flag: South Africa")
    assert "flag of South Africa" in caption_for(flag, 0)
    assert caption_for(flag) == caption_for(flag)  # the per-emoji choice is stable


def test_classnames_are_readable():
    assert classname("face-smiling") == "face smiling"
    assert classname("av-symbol") == "audio and video symbol"
    assert "-" not in classname("person-sport") and "&" not in classname("food & drink")


def test_limit_build_layout_and_contents(tmp_path):
    out = tmp_path / "emoji"
    manifest = build_emoji_dataset(out, image_size=32, limit=80, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emoji"]  # no temporary directory left
    for name in ("classnames.txt", "zeroshot_classification_templates.txt", "manifest.json"):
        assert (out / name).is_file()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert "CC BY-SA 4.0" in json.dumps(manifest["license"])
    classnames = (out / "classnames.txt").read_text().splitlines()
    assert manifest["num_classes"] == len(classnames) > 10
    templates = (out / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert all("{c}" in t for t in templates)
    for split in ("train", "test"):
        samples = list(iter_image_text(resolve_shards(out, split)))
        assert len(samples) == manifest["splits"][split] > 0
        with tarfile.open(out / split / "0.tar") as tar:
            assert len(tar.getmembers()) == 4 * len(samples)  # png, txt, cls and json, one each
        for s in samples:
            assert s.image.size == (32, 32) and s.image.mode == "RGB"
            assert 0 <= s.label < len(classnames)
            assert s.meta["emoji"] and s.meta["name"] and s.meta["group"] and s.meta["subgroup"]
            assert s.caption in s.meta["captions"]
            assert classnames[s.label] == classname(s.meta["subgroup"])
    with pytest.raises(FileExistsError):
        build_emoji_dataset(out, limit=10, progress=False)


def test_images_are_drawn_not_blank(tmp_path):
    build_emoji_dataset(tmp_path / "e", image_size=64, limit=20, progress=False)
    for s in iter_image_text(resolve_shards(tmp_path / "e", "train")):
        colors = s.image.getcolors(64 * 64)
        assert len(colors) > 10  # an emoji, not a white square
        assert s.image.getpixel((0, 0)) == (255, 255, 255)  # on white, with a margin


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = emoji_mod.render_emoji

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(emoji_mod, "render_emoji", failing)
    with pytest.raises(RuntimeError):
        build_emoji_dataset(tmp_path / "e", limit=30, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_second_art_style_split_when_a_font_is_present(tmp_path, monkeypatch):
    # Debian's Noto Color Emoji may not be installed; any second color font exercises the same path.
    font = emoji_mod.find_noto_font() or (emoji_mod._openmoji_dir() / "font" / "glyf_colr0.ttf")
    monkeypatch.setattr(emoji_mod, "find_noto_font", lambda: font)
    manifest = build_emoji_dataset(tmp_path / "e", limit=60, progress=False)
    blank = manifest["skipped"]["rendered_blank"]["test_noto"]  # a font may lack the newest emoji
    assert manifest["splits"]["test_noto"] + blank == manifest["splits"]["test"] > 0
    noto = list(iter_image_text(resolve_shards(tmp_path / "e", "test_noto")))
    test = list(iter_image_text(resolve_shards(tmp_path / "e", "test")))
    assert {s.key for s in noto} <= {s.key for s in test} and len(noto) == manifest["splits"]["test_noto"] > 0
    assert all(isinstance(s.image, PIL.Image.Image) for s in noto)
