import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from reinforced_data import emoji as emoji_mod
from reinforced_data.emoji import (
    BlankGlyphError,
    build_emoji_dataset,
    caption_for,
    captions_for,
    classname,
    find_noto_font,
    load_emoji_records,
    load_openmoji_font,
    render_emoji,
    split_records,
)
from reinforced_data.shards import iter_image_text, resolve_shards

LIMIT = 100


@pytest.fixture(scope="module")
def records():
    return load_emoji_records()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    """One small build shared by the layout tests (with test_noto/ when the Noto font is installed)."""
    out = tmp_path_factory.mktemp("built") / "emoji"
    return out, build_emoji_dataset(out, image_size=32, limit=LIMIT, progress=False)


def _tar_samples(split_dir: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for i in range(int((split_dir / "nshards.txt").read_text())):
        with tarfile.open(split_dir / f"{i}.tar") as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
    return samples


# ----------------------------------------------------------------------------------------------------- records


def test_records_are_every_fully_qualified_emoji_openmoji_draws(records):
    kept, dropped = emoji_mod._load_records_and_dropped()
    assert kept == records and len(records) > 3000
    status_count = re.search(r"# fully-qualified : (\d+)", emoji_mod._emoji_test_text())
    assert len(records) + len(dropped) == int(status_count.group(1))
    assert len({r.codepoints for r in records}) == len(records)
    by_name = {r.name: r for r in records}
    # OpenMoji names some files without the FE0F that Unicode's fully-qualified form carries (263A.svg).
    assert by_name["smiling face"].codepoints == "263A-FE0F"
    assert by_name["woman technologist"].codepoints == "1F469-200D-1F4BB"
    assert by_name["woman technologist"].subgroup == "person-role"
    # The tone modifier takes FE0F's place ("1F575-1F3FF"); the base is still spelled as the base emoji is.
    assert by_name["detective: dark skin tone"].base == by_name["detective"].base == "1F575-FE0F"
    assert by_name["woman detective: light skin tone"].base == by_name["woman detective"].codepoints
    assert by_name["grinning face"].group == "Smileys & Emotion"
    assert by_name["grinning face"].emoji == "\U0001f600"


# ----------------------------------------------------------------------------------------------------- split


def test_split_holds_out_whole_bases_about_15_percent_deterministically(records):
    train, test = split_records(records)
    assert len(train) + len(test) == len(records)
    train_bases, test_bases = {r.base for r in train}, {r.base for r in test}
    assert not train_bases & test_bases
    assert 0.12 < len(test_bases) / len(train_bases | test_bases) < 0.18
    assert {r.subgroup for r in test} <= {r.subgroup for r in train}  # every test class is also trained on
    assert split_records(records) == (train, test)
    assert split_records(list(reversed(records)))[1] == list(reversed(test))  # order-independent
    assert split_records(records, seed=1) != (train, test)


def test_split_keeps_skin_tone_variants_together(records):
    train, test = split_records(records)
    sides = defaultdict(set)
    for side, part in (("train", train), ("test", test)):
        for r in part:
            sides[emoji_mod._tone_free_name(r.name)].add(side)
    assert all(len(s) == 1 for s in sides.values())
    # Mixed-tone handshakes have another base (1FAF1-200D-1FAF2) than "handshake" (1F91D) but stay with it.
    handshakes = [r for r in records if r.name.startswith("handshake")]
    assert len({r.base for r in handshakes}) == 2
    assert len({r in test for r in handshakes}) == 1


# ----------------------------------------------------------------------------------------------------- text


def test_captions_are_natural_and_varied(records):
    for r in records[::37]:
        captions = captions_for(r)
        assert 4 <= len(set(captions)) == len(captions)
        assert caption_for(r) in captions and caption_for(r) == caption_for(r)
        words = [w for w in re.split(r"[\s:,“”]+", r.name) if w.isalnum()]  # "keycap: #" -> "keycap number sign"
        for c in captions:
            assert c.endswith(".") and "  " not in c and c == c.strip() and ":" not in c
            assert all(w in c for w in words), (c, words)
    assert len({caption_for(r) for r in records}) > 0.9 * len(records)
    assert len({caption_for(r).split(" ")[1] for r in records}) >= 4  # the templates are all in use
    by_name = {r.name: r for r in records}
    assert caption_for(by_name["flag: South Africa"], 0) == "an emoji of a flag of South Africa."
    assert "family of a man, a woman and a boy" in caption_for(by_name["family: man, woman, boy"], 0)
    assert caption_for(by_name["woman technologist"], 0) == "an emoji of a woman technologist."
    assert caption_for(by_name["OK hand"], 0) == "an emoji of an OK hand."
    assert caption_for(by_name["folded hands"], 0) == "an emoji of folded hands."
    assert "with medium skin tone" in caption_for(by_name["woman technologist: medium skin tone"], 0)


def test_classnames_are_readable(records):
    assert classname("face-smiling") == "face smiling"
    assert classname("person-sport") == "person sport"
    assert classname("sky & weather") == "sky and weather"
    names = {classname(r.subgroup) for r in records}
    assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", n) for n in names), names
    assert len(names) == len({r.subgroup for r in records})


# ----------------------------------------------------------------------------------------------------- render


def test_render_is_a_centered_rgb_square_on_white():
    image = render_emoji("\U0001f600", load_openmoji_font(), 48)
    assert image.mode == "RGB" and image.size == (48, 48)
    corners = [(0, 0), (47, 0), (0, 47), (47, 47)]
    assert all(image.getpixel(xy) == (255, 255, 255) for xy in corners)
    bbox = Image.eval(image.convert("L"), lambda v: 255 - v).point(lambda v: 255 if v > 8 else 0).getbbox()
    assert bbox[0] >= 1 and bbox[1] >= 1 and bbox[2] <= 47 and bbox[3] <= 47  # a margin, nothing clipped
    assert max(bbox[2] - bbox[0], bbox[3] - bbox[1]) >= 0.8 * 48  # fills most of the square
    assert len(image.getcolors(48 * 48)) > 10  # a drawing, not a white square
    with pytest.raises(BlankGlyphError):
        render_emoji("\u200d", load_openmoji_font(), 48)


# ----------------------------------------------------------------------------------------------------- build


def test_limit_build_layout_counts_and_samples(built, records):
    out, manifest = built
    assert sorted(p.name for p in out.parent.iterdir()) == ["emoji"]  # the temporary directory was renamed
    for name in ("train/nshards.txt", "test/nshards.txt", "train/0.tar", "test/0.tar", "classnames.txt",
                 "zeroshot_classification_templates.txt", "manifest.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert "CC BY-SA 4.0" in json.dumps(manifest["attribution"]) and manifest["license"] == "CC BY-SA 4.0"
    assert manifest["records"]["kept"] == len(records)
    classnames = (out / "classnames.txt").read_text().splitlines()
    assert manifest["num_classes"] == len(classnames) >= 10
    templates = (out / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(templates) >= 6 and all("{c}" in t for t in templates)

    train, test = manifest["splits"]["train"], manifest["splits"]["test"]
    assert 0.9 * LIMIT <= train + test <= LIMIT and 0.1 < test / (train + test) < 0.2
    classes = {}
    for split in ("train", "test"):
        raw = _tar_samples(out / split)
        assert len(raw) == manifest["splits"][split]
        assert all(set(s) == {"png", "txt", "cls", "json"} for s in raw.values())
        samples = list(iter_image_text(resolve_shards(out, split)))
        assert len(samples) == manifest["splits"][split]
        for s in samples:
            assert s.image.mode == "RGB" and s.image.size == (32, 32)
            assert 0 <= s.label < len(classnames) and classnames[s.label] == classname(s.meta["subgroup"])
            assert s.key == s.meta["codepoints"] and s.caption in s.meta["captions"]
            assert {"emoji", "name", "group", "subgroup", "codepoints", "base"} <= set(s.meta)
        classes[split] = {s.label for s in samples}
    assert len(classes["test"]) >= 5 and classes["test"] <= classes["train"]
    assert len(classes["train"] | classes["test"]) == len(classnames)  # only classes that occur are listed
    _, full_test = split_records(records)
    assert {s.key for s in iter_image_text(resolve_shards(out, "test"))} <= {r.codepoints for r in full_test}

    with pytest.raises(FileExistsError):
        build_emoji_dataset(out, limit=10, progress=False)


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = emoji_mod.render_emoji

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(emoji_mod, "render_emoji", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        build_emoji_dataset(tmp_path / "emoji", limit=30, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_clip_benchmark_reads_the_dataset_root(built):
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    from torchvision import transforms

    out, manifest = built
    ds = builder.build_dataset("wds/emoji", root=str(out), split="test", transform=transforms.ToTensor(),
                               download=False)
    assert ds.classes == (out / "classnames.txt").read_text().splitlines()
    assert all("{c}" in t for t in ds.templates)
    pairs = list(ds)
    assert len(pairs) == manifest["splits"]["test"]
    assert all(image.shape == (3, 32, 32) and 0 <= label < len(ds.classes) for image, label in pairs)


def test_without_noto_there_is_no_test_noto(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji_mod, "find_noto_font", lambda: None)
    manifest = build_emoji_dataset(tmp_path / "emoji", limit=20, progress=False)
    assert "test_noto" not in manifest["splits"] and not (tmp_path / "emoji" / "test_noto").exists()


@pytest.mark.skipif(find_noto_font() is None, reason="Noto Color Emoji is not installed (fonts-noto-color-emoji)")
def test_noto_split_renders_the_test_emoji(built):
    out, manifest = built
    noto_skipped = sum(n for key, n in manifest["skipped_counts"].items() if key.startswith("test_noto"))
    assert manifest["splits"]["test_noto"] + noto_skipped == manifest["splits"]["test"]
    noto = list(iter_image_text(resolve_shards(out, "test_noto")))
    test = {s.key: s for s in iter_image_text(resolve_shards(out, "test"))}
    assert len(noto) == manifest["splits"]["test_noto"] > 0
    for s in noto:
        assert s.label == test[s.key].label and s.image.size == (32, 32)
        assert s.image.tobytes() != test[s.key].image.tobytes()  # another art style
