"""Reading image-text webdataset shards (img2dataset / open_clip conventions).

A sample is the group of tar members that share a key: an image (`jpg|jpeg|png|webp`), a caption (`txt`), and
optionally a class index (`cls`) and metadata (`json`). `--data` may be a dataset root (`DIR/{split}/*.tar`), a
directory of `.tar` files, one `.tar` file, or a brace pattern such as `data/{00000..00099}.tar`.

Bad samples are skipped and recorded with their reason; a shard that cannot be read at all is recorded and the
others still complete.
"""

import io
import json
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
from webdataset.tariterators import group_by_keys, tar_file_iterator

from mdcore.errors import UserInputError

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


@dataclass
class ImageTextSample:
    key: str
    image: PIL.Image.Image  # RGB
    caption: str
    label: int | None = None  # the `cls` member, when present
    meta: dict[str, Any] = field(default_factory=dict)  # the `json` member, when present
    image_bytes: bytes = b""
    image_ext: str = "png"


@dataclass
class SkipLog:
    """What was skipped and why: single samples (`samples`) and whole unreadable shards (`shards`)."""

    samples: list[dict[str, str]] = field(default_factory=list)
    shards: list[dict[str, str]] = field(default_factory=list)

    def skip_sample(self, key: str, reason: str) -> None:
        self.samples.append({"key": key, "reason": reason})

    def skip_shard(self, url: str, reason: str) -> None:
        self.shards.append({"shard": url, "reason": reason})

    def summary(self) -> str:
        """One line: how many samples were skipped, by reason, and which shards could not be read."""
        reasons = Counter(s["reason"].split(":")[0] for s in self.samples)
        parts = []
        if self.samples:
            by_reason = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
            parts.append(f"skipped {len(self.samples)} bad samples ({by_reason})")
        if self.shards:
            parts.append(f"{len(self.shards)} unreadable shards: " + ", ".join(s["shard"] for s in self.shards))
        return "; ".join(parts) or "nothing skipped"



def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def resolve_shards(data: str | Path, split: str | None = None) -> list[str]:
    """Expand `--data` into a list of shard paths, or raise `UserInputError` saying what is wrong."""
    data = str(data)
    if not data.strip():
        raise UserInputError("empty --data")
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
    nshards = path / "nshards.txt"
    if nshards.is_file():
        try:
            count = int(nshards.read_text().strip())
        except ValueError as e:
            raise UserInputError(f"{nshards} does not hold a shard count") from e
        urls = [str(path / f"{i}.tar") for i in range(count)]
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise UserInputError(f"{path}: nshards.txt says {count} shards but {missing[0]} is missing")
        return urls
    urls = sorted((str(p) for p in path.glob("*.tar")), key=_natural_key)
    if not urls:
        raise UserInputError(f"no .tar shards in {path}")
    return urls


def iter_raw_samples(urls: Iterable[str], skips: SkipLog | None = None) -> Iterator[dict[str, Any]]:
    """Yield raw samples (`__key__`, `__url__`, and bytes per extension) shard by shard."""
    skips = skips if skips is not None else SkipLog()
    for url in urls:
        try:
            with open(url, "rb") as stream:
                members = tar_file_iterator(stream)
                yield from group_by_keys(_with_url(members, url))
        except (OSError, tarfile.TarError, ValueError) as e:
            skips.skip_shard(url, f"unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _with_url(members: Iterator[dict[str, Any]], url: str) -> Iterator[dict[str, Any]]:
    for member in members:
        member["__url__"] = url
        yield member


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
        image = PIL.Image.open(io.BytesIO(raw[ext]))
        image.load()
        image = image.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise ValueError(f"undecodable image: {type(e).__name__}") from e
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
    meta = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError("json is malformed") from e
    return ImageTextSample(key, image, caption, label, meta, raw[ext], ext)


def iter_image_text(urls: Iterable[str], skips: SkipLog | None = None) -> Iterator[ImageTextSample]:
    """Decoded samples from shards, bad ones skipped and recorded in `skips`."""
    skips = skips if skips is not None else SkipLog()
    for raw in iter_raw_samples(urls, skips):
        try:
            yield decode_sample(raw)
        except ValueError as e:
            skips.skip_sample(raw.get("__key__", "?"), str(e))


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
