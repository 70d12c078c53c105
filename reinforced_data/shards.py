"""Reading image-text webdataset shards (img2dataset / open_clip conventions).

A sample is the group of tar members that share a key: an image (`jpg|jpeg|png|webp`), a caption (`txt`), and
optionally a class index (`cls`) and metadata (`json`). `--data` may be a dataset root (`DIR/{split}/*.tar`), a
directory of `.tar` files, one `.tar` file, or a brace pattern such as `data/{00000..00099}.tar`.

Bad samples are skipped and recorded with their reason; a shard that cannot be read at all is recorded and the
others still complete.
"""

import io
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import PIL.Image
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from mdcore.errors import UserInputError, first_line
from mdcore.jsonio import parse_json
from mdcore.names import NSHARDS
from reinforced_data.locations import basename, is_url, join, list_locations, location_exists, open_location, read_bytes

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageTextSample",
    "SkipLog",
    "resolve_shards",
    "iter_raw_samples",
    "open_tar_writer",
    "decode_sample",
    "is_safe_key",
    "iter_image_text",
    "read_lines",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_SHARDS = 10_000_000  # DataComp-1B has 140k shards


@dataclass
class ImageTextSample:
    key: str
    image: PIL.Image.Image  # RGB
    caption: str
    label: int | None = None  # the `cls` member, when present
    meta: dict[str, Any] = field(default_factory=dict)  # the `json` member, when present
    image_bytes: bytes = b""
    image_ext: str = "png"
    url: str = ""  # the shard it came from


@dataclass
class SkipLog:
    """What was skipped and why: single samples (`samples`, each with its key, reason and shard) and whole
    unreadable shards (`shards`). Counts are exact; the entries kept are bounded (`MAX_ENTRIES`), so a dataset
    that is all bad cannot fill memory with its skip log."""

    MAX_ENTRIES = 10_000
    samples: list[dict[str, str]] = field(default_factory=list)
    shards: list[dict[str, str]] = field(default_factory=list)
    sample_count: int = 0
    by_reason: Counter = field(default_factory=Counter)
    by_shard: Counter = field(default_factory=Counter)

    def skip_sample(self, key: str, reason: str, shard: str | None = None) -> None:
        self.sample_count += 1
        self.by_reason[reason.split(":")[0]] += 1
        self.by_shard[Path(shard).name if shard else "?"] += 1
        if len(self.samples) < self.MAX_ENTRIES:
            self.samples.append({"key": key, "reason": reason, **({"shard": shard} if shard else {})})

    def skip_shard(self, url: str, reason: str) -> None:
        if len(self.shards) < self.MAX_ENTRIES:
            self.shards.append({"shard": url, "reason": reason})

    def merge(self, other: "SkipLog | dict[str, Any]") -> "SkipLog":
        """Add another log's records (a SkipLog or its `as_dict()`); records already here are not counted again
        (processes that read the same shards report the same bad samples)."""
        other = other if isinstance(other, dict) else other.as_dict()
        seen = {(s["key"], s["reason"]) for s in self.samples}
        for entry in other["examples"]:
            if (entry["key"], entry["reason"]) not in seen:
                self.skip_sample(entry["key"], entry["reason"], entry.get("shard"))
        known = {s["shard"] for s in self.shards}
        for entry in other["unreadable_shards"]:
            if entry["shard"] not in known:
                self.skip_shard(entry["shard"], entry["reason"])
        return self

    def __bool__(self) -> bool:
        return bool(self.sample_count or self.shards)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form commands write: counts by reason and by shard, the unreadable shards, the first entries."""
        return {"summary": self.summary(), "samples": self.sample_count,
                "by_reason": dict(sorted(self.by_reason.items())),
                "by_shard": dict(sorted(self.by_shard.items(), key=lambda kv: _natural_key(kv[0]))),
                "unreadable_shards": list(self.shards), "examples": list(self.samples)}

    def summary(self) -> str:
        """One line: skipped samples by reason and by shard, and the shards that could not be read."""
        parts = []
        if self.sample_count:
            by_reason = ", ".join(f"{n} {reason}" for reason, n in sorted(self.by_reason.items()))
            shards = sorted(self.by_shard.items(), key=lambda kv: _natural_key(kv[0]))
            by_shard = ", ".join(f"{name}: {n}" for name, n in shards[:20]) + (", ..." if len(shards) > 20 else "")
            parts.append(f"skipped {self.sample_count} bad samples ({by_reason}) in {len(shards)} shards "
                         f"({by_shard})")
        if self.shards:
            parts.append(f"{len(self.shards)} unreadable shards: " + ", ".join(
                f"{s['shard']} ({s['reason']})" for s in self.shards[:20]) + (", ..." if len(self.shards) > 20 else ""))
        return "; ".join(parts) or "nothing skipped"


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _nshards(text: str, where: str) -> int:
    try:
        count = int(text.strip())
    except ValueError as e:
        raise UserInputError(f"{where} does not hold a shard count") from e
    if not 0 < count <= MAX_SHARDS:
        raise UserInputError(f"{where} says {count} shards (at most {MAX_SHARDS})")
    return count


def _resolve_remote(data: str, split: str | None) -> list[str]:
    """`resolve_shards` for URLs: a shard, a brace pattern of shards, or a directory (a dataset root with
    `SPLIT/nshards.txt`, or a listable directory of `.tar` files)."""
    if "{" in data:
        urls = list(braceexpand.braceexpand(data))
        if len(urls) > MAX_SHARDS:
            raise UserInputError(f"{data} names {len(urls)} shards (at most {MAX_SHARDS})")
        if data.startswith("pipe:"):
            return urls
        listed: dict[str, set[str]] = {}
        for url in urls:
            parent = url.rsplit("/", 1)[0]
            if parent not in listed:
                listed[parent] = {basename(u) for u in list_locations(parent, ".tar")}
        missing = [u for u in urls if basename(u) not in listed[u.rsplit("/", 1)[0]]]
        if missing and not all(listed.values()):  # a server that does not list: ask for the files themselves
            missing = [u for u in (urls[0], urls[-1]) if not location_exists(u)]
        if missing:
            raise UserInputError(f"{len(missing)} of {len(urls)} shards of {data} do not exist (first: {missing[0]})")
        return urls
    if data.startswith("pipe:") or data.rstrip("/").endswith(".tar"):
        if not location_exists(data):
            raise UserInputError(f"shard not found: {data}")
        return [data]
    roots = [join(data, split), data] if split is not None else [data]
    for root in roots:
        count_file = join(root, NSHARDS)
        if location_exists(count_file):
            count = _nshards(read_bytes(count_file, 64).decode("utf-8", errors="replace"), count_file)
            return [join(root, f"{i}.tar") for i in range(count)]
        urls = sorted(list_locations(root, ".tar"), key=_natural_key)
        if urls:
            return urls
    raise UserInputError(f"no .tar shards at {data}" + (f" (nor in its {split}/ split)" if split else ""))


def resolve_shards(data: str | Path, split: str | None = None) -> list[str]:
    """Expand `--data` into a list of shard paths or URLs, or raise `UserInputError` saying what is wrong."""
    data = str(data)
    if not data.strip():
        raise UserInputError("empty --data")
    if is_url(data):
        return _resolve_remote(data, split)
    if "{" in data:
        urls = list(braceexpand.braceexpand(data))
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise UserInputError(f"{len(missing)} of {len(urls)} shards of {data} do not exist (first: {missing[0]})")
        return urls
    path = Path(data).expanduser()
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise UserInputError(f"{path} is not a tar file")
        return [str(path)]
    if not path.is_dir():
        raise UserInputError(f"data path not found: {path}")
    if split is not None and (path / split).is_dir():
        path = path / split
    elif split is not None and (path / "train").is_dir():
        raise UserInputError(f"dataset root {path} has no split {split!r}")
    nshards = path / NSHARDS
    if nshards.is_file():
        count = _nshards(nshards.read_text(errors="replace"), str(nshards))
        urls = [str(path / f"{i}.tar") for i in range(count)]
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise UserInputError(f"{path}: nshards.txt says {count} shards but {missing[0]} is missing")
        return urls
    urls = sorted((str(p) for p in path.glob("*.tar")), key=_natural_key)
    if not urls:
        raise UserInputError(f"no .tar shards in {path}")
    return urls


MAX_MEMBER_BYTES = 128 * 1024 * 1024  # a tar member larger than this is never read into memory
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # decoded images above this (8K photos are 33M) are skipped, not allocated
MAX_JSON_MEMBER_BYTES = 1024 * 1024  # metadata, stored augmentations and captions of one sample
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


def _tar_members(stream, url: str) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of each regular member in tar order; bytes None for a member over `MAX_MEMBER_BYTES`."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg() or _META_MEMBER.match(info.name):  # webdataset's __meta__ members
                continue
            if info.size > MAX_MEMBER_BYTES:
                yield info.name, None
            else:
                yield info.name, tar.extractfile(info).read()
            tar.members = []  # streaming: keep no index of what was read


def _group_samples(members: Iterator[tuple[str, bytes | None]], url: str, skips: SkipLog
                   ) -> Iterator[dict[str, Any]]:
    """webdataset's grouping of consecutive members by key (`base_plus_ext`), where one bad sample (a duplicate
    member, an oversized member) is skipped and recorded instead of ending its shard."""
    sample: dict[str, Any] | None = None
    problem = None

    def finished():
        if sample is not None and problem:
            skips.skip_sample(sample["__key__"], problem, url)
        return sample is not None and not problem and len(sample) > 2

    for name, data in members:
        key, suffix = base_plus_ext(name)
        if key is None:
            continue
        suffix = suffix.lower()
        if sample is None or key != sample["__key__"]:
            if finished():
                yield sample
            sample, problem = {"__key__": key, "__url__": url}, None
        if data is None:
            problem = problem or f"member too large: .{suffix} over {MAX_MEMBER_BYTES} bytes"
        elif suffix in sample:
            problem = problem or f"duplicate member: .{suffix}"
        else:
            sample[suffix] = data
    if finished():
        yield sample


def iter_raw_samples(urls: Iterable[str], skips: SkipLog | None = None) -> Iterator[dict[str, Any]]:
    """Yield raw samples (`__key__`, `__url__`, and bytes per extension) shard by shard; bad samples and unreadable
    shards are recorded in `skips` and the others still come."""
    skips = skips if skips is not None else SkipLog()
    for url in urls:
        try:
            with open_location(url) as stream:
                yield from _group_samples(_tar_members(stream, url), url, skips)
        except Exception as e:  # noqa: BLE001 - a remote read fails with its client's own types (aiohttp, botocore)
            skips.skip_shard(url, f"unreadable: {first_line(e)}")


def is_safe_key(key: str) -> bool:
    """A sample key that, written as a tar member name, stays inside the directory it is extracted to."""
    parts = key.replace("\\", "/").split("/")
    return bool(key) and "\x00" not in key and not key.startswith(("/", "~")) and ".." not in parts and \
        ":" not in parts[0]


def decode_sample(raw: dict[str, Any]) -> ImageTextSample:
    """Decode one raw sample; raise ValueError with the reason when it is unusable."""
    key = raw.get("__key__", "?")
    if not is_safe_key(key):
        raise ValueError("unsafe key: a member name that would escape its directory")
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise ValueError("no image")
    try:
        image = PIL.Image.open(io.BytesIO(raw[ext]))  # reads the header only
        too_large = image.width * image.height > MAX_IMAGE_PIXELS
        if not too_large:
            image.load()
            image = image.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise ValueError(f"undecodable image: {type(e).__name__}") from e
    if too_large:
        raise ValueError(f"image too large: {image.width} x {image.height} pixels")
    if "txt" not in raw:
        raise ValueError("no caption")
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError("caption is not UTF-8") from e
    if not caption:
        raise ValueError("empty caption")
    label = None
    if "cls" in raw:
        try:
            label = int(raw["cls"].decode().strip())
        except ValueError as e:
            raise ValueError("cls is not an integer") from e
    meta = parse_metadata(raw["json"]) if "json" in raw else {}
    return ImageTextSample(key, image, caption, label, meta, raw[ext], ext, raw.get("__url__", ""))


def parse_metadata(member: bytes) -> dict[str, Any]:
    """The `json` member of a sample: an object, whose `captions`, when present, is a non-empty list of strings (the
    extra captions teacher training draws from); ValueError with the reason otherwise."""
    try:
        meta = parse_json(member, max_bytes=MAX_JSON_MEMBER_BYTES)
    except ValueError as e:
        raise ValueError(f"json is {e}") from e
    if not isinstance(meta, dict):
        raise ValueError("json is not an object")
    captions = meta.get("captions")
    if captions is not None and not (isinstance(captions, list) and captions and all(
            isinstance(c, str) and c.strip() for c in captions)):
        raise ValueError("json captions is not a list of captions")
    return meta


def iter_image_text(urls: Iterable[str], skips: SkipLog | None = None) -> Iterator[ImageTextSample]:
    """Decoded samples from shards, bad ones skipped and recorded in `skips`."""
    skips = skips if skips is not None else SkipLog()
    for raw in iter_raw_samples(urls, skips):
        try:
            yield decode_sample(raw)
        except ValueError as e:
            skips.skip_sample(raw.get("__key__", "?"), str(e), raw.get("__url__"))


def open_tar_writer(path: str | Path) -> wds.TarWriter:
    """A webdataset tar writer whose output depends on the samples alone (a fixed, integer mtime).

    With the default fractional mtime, tarfile's PAX format adds an extended header to every member (about 1 KiB
    per member, more than a small embedding); a fixed mtime also makes reruns byte-identical.
    """
    return wds.TarWriter(str(path), mtime=0)


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file (classnames.txt, templates)."""
    if not path.is_file():
        raise UserInputError(f"{path} not found")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
