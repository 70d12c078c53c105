"""Reading reinforced datasets: ours, and Apple's released DataCompDR shards as they are.

`open_reinforced(path, images=None)` yields one dict per sample:

    key, image (PIL or None), caption (str or None), syn_captions (list[str]),
    param_aug (K stored augmentations, DataCompDR layout), image_emb (K, D) and text_emb (1 + C, D) float32 tensors
    (row 0 of text_emb is the real caption), image_bytes, meta (the `json` member)

Apple's shards hold no images or captions (they are in the DataComp shards of the same keys): give those shards as
`images` and they are joined by `__key__`. Embeddings stored as int8 are dequantized with the teachers' dimensions
from config.json.
"""

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mdcore.errors import UserInputError
from reinforced_data.augment import AugmentationConfig
from reinforced_data.shards import IMAGE_EXTENSIONS, SkipLog, decode_sample, iter_raw_samples, resolve_shards
from reinforced_data.storage import decode_embeddings

__all__ = ["ReinforcedInfo", "read_info", "open_reinforced", "index_images", "parse_param_aug"]


@dataclass
class ReinforcedInfo:
    """What config.json says (or, for Apple's shards without one, what the first sample shows)."""

    format: str  # "mobiledistill" or "datacompdr"
    shards: list[str]
    teachers: list[dict[str, Any]]  # spec, dim, logit_scale
    num_augs: int | None
    num_captions: int | None
    dtype: str | None
    augmentation: AugmentationConfig
    config: dict[str, Any]

    @property
    def dims(self) -> list[int] | None:
        """Each teacher's embedding dimension, or None where the config does not say (Apple's)."""
        if not self.teachers or any(t.get("dim") is None for t in self.teachers):
            return None
        return [int(t["dim"]) for t in self.teachers]


def _apple_teachers(config: dict[str, Any]) -> list[dict[str, Any]]:
    """DataCompDR's config names its teachers as comma-joined `model_name` and `pretrained` (two ViT-L-14 there)."""
    names = [n for n in str(config.get("model_name", "")).split(",") if n]
    tags = [t for t in str(config.get("pretrained", "")).split(",") if t]
    dims = config.get("teacher_dims")
    teachers = []
    for i, name in enumerate(names):
        tag = tags[i] if i < len(tags) else None
        teachers.append({"spec": f"{name}@{tag}" if tag else name, "dim": dims[i] if dims else None,
                         "logit_scale": 100.0})  # Apple's training scripts use 100 for both ViT-L-14 teachers
    return teachers


def read_info(path: str | Path) -> ReinforcedInfo:
    """Describe a reinforced dataset directory (or shard pattern) from its config.json."""
    path_str = str(path)
    root = Path(path_str)
    config: dict[str, Any] = {}
    if root.is_dir():
        config_path = root / "config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as e:
                raise UserInputError(f"{config_path} is not valid JSON") from e
        elif (root / "reinforce_run.json").is_file():
            raise UserInputError(f"{root} is an unfinished reinforced dataset (run `reinforce` again to finish it)")
        shards = [str(root / s) for s in config.get("shards", [])] or resolve_shards(root)
    else:
        shards = resolve_shards(path_str)
    if config.get("format") == "mobiledistill":
        teachers = config["teachers"]
        fmt = "mobiledistill"
    else:
        teachers = _apple_teachers(config)
        fmt = "datacompdr"
    augmentation = AugmentationConfig.from_config(config.get("reinforce", {}).get("image_augmentation", {}))
    return ReinforcedInfo(fmt, shards, teachers, config.get("num_augs", config.get("num_samples")),
                          config.get("num_captions"), config.get("dtype"), augmentation, config)


def parse_param_aug(member: bytes | str) -> list:
    """`paug.json` -> the list of stored augmentations; `param_aug` may be a JSON string (Apple's shards) or a list."""
    value = json.loads(member)["param_aug"]
    return json.loads(value) if isinstance(value, str) else value


def _embedding_member(raw: dict[str, Any]) -> tuple[str, bytes]:
    for ext in ("npz", "pth.gz"):
        if ext in raw:
            return ext, raw[ext]
    raise ValueError("no embeddings (npz or pth.gz)")


def index_images(images: str | Path) -> dict[str, dict[str, Any]]:
    """key -> raw image-text sample (undecoded bytes) of every sample in the image shards `images`.

    Build it once and pass it as `open_reinforced(..., images=index)` to read a dataset many times (epochs)."""
    index = {}
    for raw in iter_raw_samples(resolve_shards(str(images))):
        index[raw["__key__"]] = raw
    return index


def open_reinforced(path: str | Path, images: str | Path | Mapping[str, dict[str, Any]] | None = None,
                    skips: SkipLog | None = None, decode_images: bool = True) -> Iterator[dict[str, Any]]:
    """Iterate a reinforced dataset's samples with dequantized float embeddings (see the module docstring).

    `images`: image-text shards to join by key, or an index of them from `index_images`. With `decode_images` off,
    samples carry their undecoded image-text sample as `image_source` (for `shards.decode_sample`) and `image` is
    None: a training process that uses only some of the samples decodes only those."""
    info = read_info(path)
    skips = skips if skips is not None else SkipLog()
    if images is None:
        joined = {}
    elif isinstance(images, Mapping):
        joined = images
    else:
        joined = index_images(images)
    for raw in iter_raw_samples(info.shards, skips):
        key = raw["__key__"]
        try:
            ext, blob = _embedding_member(raw)
            image_emb, text_emb = decode_embeddings(ext, blob, info.dims)
            param_aug = parse_param_aug(raw["paug.json"]) if "paug.json" in raw else []
            syn = json.loads(raw["syn.json"]).get("syn_text", []) if "syn.json" in raw else []
            meta = json.loads(raw["json"]) if "json" in raw else {}
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            skips.skip_sample(key, f"malformed reinforced sample: {e}")
            continue
        source = raw if any(e in raw for e in IMAGE_EXTENSIONS) else joined.get(key)
        image, caption, image_bytes = None, None, b""
        if source is not None and not decode_images:
            caption = source["txt"].decode("utf-8", errors="replace").strip() if "txt" in source else None
        elif source is not None:
            try:
                decoded = decode_sample(source)
                image, caption, image_bytes = decoded.image, decoded.caption, decoded.image_bytes
            except ValueError as e:
                skips.skip_sample(key, str(e))
                continue
        elif "txt" in raw:
            caption = raw["txt"].decode("utf-8").strip()
        yield {"key": key, "image": image, "caption": caption, "syn_captions": syn, "param_aug": param_aug,
               "image_emb": torch.from_numpy(image_emb), "text_emb": torch.from_numpy(text_emb),
               "image_bytes": image_bytes, "meta": meta,
               **({} if decode_images else {"image_source": source})}
