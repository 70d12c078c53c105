"""Reading reinforced datasets: ours, and Apple's released DataCompDR shards as they are.

`open_reinforced(path, images=None)` yields one dict per sample:

    key, image (PIL or None), caption (str or None), syn_captions (list[str], every caption set's in order),
    caption_sets ({key: number of captions}, e.g. {"syn_text_coca": 5}), param_aug (K stored augmentations,
    DataCompDR layout), image_emb (K, D) and text_emb (1 + C, D) float32 tensors (row 0 of text_emb is the real
    caption, then the synthetic ones in syn_captions' order), image_bytes, meta (the `json` member)

Synthetic captions come in sets, `syn_text<suffix>` keys of `syn.json`: one set `syn_text` whose embeddings follow
the real caption's in `text_emb` (DataCompDR v1, older mobiledistill datasets), or one set per captioner with its
embeddings under `<key>_emb` (Apple's newer layout, and what `reinforce` writes). Apple's shards hold no images or
captions (they are in the DataComp shards of the same keys): give those shards as `images` and they are joined by
`__key__`. Embeddings stored as int8 are dequantized with the teachers' dimensions from config.json.
"""

import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdcore.errors import UserInputError
from mdcore.jsonio import MAX_JSON_BYTES, parse_json, read_json_file
from mdcore.names import EXTEND_RUN, REINFORCE_RUN, REINFORCED_CONFIG
from reinforced_data.augment import AugmentationConfig, check_augmentation
from reinforced_data.locations import basename, is_url, join, location_exists, read_bytes
from reinforced_data.shards import (
    IMAGE_EXTENSIONS,
    MAX_JSON_MEMBER_BYTES,
    SkipLog,
    decode_sample,
    iter_raw_samples,
    parse_metadata,
    resolve_shards,
)
from reinforced_data.storage import STORAGE_DTYPES, decode_embedding_arrays

__all__ = ["ReinforcedInfo", "read_info", "open_reinforced", "reinforced_records", "parse_reinforced",
           "pair_image_shards", "join_images", "parse_param_aug", "parse_caption_sets", "parse_synthetic_captions",
           "SYN_KEY"]


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


MAX_TEACHER_DIM = 65536
MAX_VIEWS = 1024  # stored augmentations per sample (DataCompDR: 30)
MAX_CAPTIONS = 1024  # synthetic captions per sample (DataCompDR: 5)
MAX_CAPTION_CHARS = 4096


def _apple_teachers(config: dict[str, Any]) -> list[dict[str, Any]]:
    """DataCompDR's config names its teachers as comma-joined `model_name` and `pretrained` (two ViT-L-14 there)."""
    names = [n for n in str(config.get("model_name", "")).split(",") if n]
    tags = [t for t in str(config.get("pretrained", "")).split(",") if t]
    dims = config.get("teacher_dims")
    teachers = []
    for i, name in enumerate(names):
        tag = tags[i] if i < len(tags) else None
        dim = dims[i] if isinstance(dims, list) and i < len(dims) else None
        teachers.append({"spec": f"{name}@{tag}" if tag else name, "dim": dim,
                         "logit_scale": 100.0})  # Apple's training scripts use 100 for both ViT-L-14 teachers
    return teachers


def _check_config(config: dict[str, Any], teachers: list[Any], where: str) -> None:
    """What readers rely on in a reinforced dataset's config.json, checked before any of it is used."""
    def bad(what: str):
        return UserInputError(f"{where}: {what}")

    if not isinstance(teachers, list) or not all(isinstance(t, dict) for t in teachers):
        raise bad("teachers is not a list of objects")
    for t in teachers:
        dim, scale = t.get("dim"), t.get("logit_scale")
        if not isinstance(t.get("spec"), str):
            raise bad(f"a teacher's spec is not a string: {t.get('spec')!r}")
        if dim is not None and not (type(dim) is int and 0 < dim <= MAX_TEACHER_DIM):
            raise bad(f"teacher {t['spec']}'s dim {dim!r} is not an integer in [1, {MAX_TEACHER_DIM}]")
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < 1e6):
            raise bad(f"teacher {t['spec']}'s logit_scale {scale!r} is not a positive number")
    shards = config.get("shards", [])
    if not isinstance(shards, list) or not all(isinstance(n, str) and n and "/" not in n and "\\" not in n
                                               and n not in (".", "..") for n in shards):
        raise bad("shards is not a list of shard file names in the dataset directory")
    counts = (("num_augs", 1, MAX_VIEWS), ("num_samples", 1, MAX_VIEWS), ("num_captions", 0, MAX_CAPTIONS))
    for key, low, high in counts:
        value = config.get(key)
        if value is not None and not (type(value) is int and low <= value <= high):
            raise bad(f"{key} {value!r} is not an integer in [{low}, {high}]")
    if config.get("dtype") is not None and config["dtype"] not in STORAGE_DTYPES:
        raise bad(f"dtype {config['dtype']!r} is not one of {', '.join(STORAGE_DTYPES)}")
    if not isinstance(config.get("reinforce", {}), dict) or not isinstance(
            config.get("reinforce", {}).get("image_augmentation", {}), dict):
        raise bad("reinforce.image_augmentation is not an object")


def read_info(path: str | Path, allow_extending: bool = False) -> ReinforcedInfo:
    """Describe a reinforced dataset directory (or shard pattern) from its config.json, checked. A dataset that an
    unfinished `reinforce --add-to` is extending is refused (`allow_extending`: by that command itself)."""
    path_str = str(path)
    remote = is_url(path_str)
    directory = remote and "{" not in path_str and not path_str.rstrip("/").endswith(".tar") or (
        not remote and Path(path_str).is_dir())
    config: dict[str, Any] = {}
    config_path = join(path_str, REINFORCED_CONFIG)
    if directory and not remote:
        if Path(config_path).is_file():
            config = read_json_file(config_path)
        elif Path(path_str, REINFORCE_RUN).is_file():
            raise UserInputError(f"{path_str} is an unfinished reinforced dataset (run `reinforce` again to finish "
                                 "it)")
        if Path(path_str, EXTEND_RUN).is_file() and not allow_extending:
            raise UserInputError(f"{path_str} is being extended by an unfinished `reinforce --add-to` (run it again "
                                 "to finish it)")
    elif directory and location_exists(config_path):
        try:
            config = parse_json(read_bytes(config_path, MAX_JSON_BYTES))
        except ValueError as e:
            raise UserInputError(f"{config_path} is {e}") from e
        if not isinstance(config, dict):
            raise UserInputError(f"{config_path} does not hold a JSON object")
    if config.get("format") == "mobiledistill":
        teachers, fmt = config.get("teachers"), "mobiledistill"
    else:
        teachers, fmt = _apple_teachers(config), "datacompdr"
    _check_config(config, teachers, config_path)
    if directory:
        shards = [join(path_str, s) for s in config.get("shards", [])] or resolve_shards(path_str)
    else:
        shards = resolve_shards(path_str)
    try:
        augmentation = AugmentationConfig.from_config(config.get("reinforce", {}).get("image_augmentation", {}))
    except UserInputError as e:
        raise UserInputError(f"{config_path}: {e}") from e
    return ReinforcedInfo(fmt, shards, teachers, config.get("num_augs", config.get("num_samples")),
                          config.get("num_captions"), config.get("dtype"), augmentation, config)


def _json_member(raw: dict[str, Any], name: str) -> Any:
    try:
        return parse_json(raw[name], max_bytes=MAX_JSON_MEMBER_BYTES)
    except ValueError as e:
        raise ValueError(f"{name} is {e}") from e


def parse_param_aug(member: bytes | str) -> list:
    """`paug.json` -> the list of stored augmentations, each checked (`check_augmentation`); `param_aug` may be a
    JSON string (Apple's shards) or a list. ValueError with the reason when malformed."""
    record = _json_member({"paug.json": member}, "paug.json")
    if not isinstance(record, dict) or "param_aug" not in record:
        raise ValueError("paug.json is not an object with param_aug")
    value = record["param_aug"]
    if isinstance(value, str):
        value = _json_member({"param_aug": value}, "param_aug")
    if not isinstance(value, list) or len(value) > MAX_VIEWS:
        raise ValueError(f"param_aug is not a list of at most {MAX_VIEWS} augmentations")
    for params in value:
        check_augmentation(params)
    return value


SYN_KEY = re.compile(r"^syn_text[A-Za-z0-9_\-]*$")  # Apple's caption sets: syn_text, syn_text_<tag>, ...


def parse_caption_sets(member: bytes | str) -> dict[str, list[str]]:
    """`syn.json` -> its caption sets, {key: captions} for every key `syn_text<suffix>` (Apple's layout: one set,
    `syn_text`, in DataCompDR v1; one per captioner in the newer one). ValueError when it is not an object of
    lists of strings."""
    record = _json_member({"syn.json": member}, "syn.json")
    if not isinstance(record, dict):
        raise ValueError("syn.json is not an object")
    sets = {}
    for key, captions in record.items():
        if not SYN_KEY.match(key):
            continue
        if not isinstance(captions, list) or len(captions) > MAX_CAPTIONS or not all(
                isinstance(c, str) and len(c) <= MAX_CAPTION_CHARS for c in captions):
            raise ValueError(f"{key} is not a list of at most {MAX_CAPTIONS} captions")
        sets[key] = captions
    return sets


def parse_synthetic_captions(member: bytes | str) -> list[str]:
    """`syn.json` -> all its synthetic captions, set after set (`parse_caption_sets`)."""
    return [c for captions in parse_caption_sets(member).values() for c in captions]


def _caption_set_embeddings(sets: dict[str, list[str]], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each caption set's embeddings: `<key>_emb` (the newer layout), or else the rows after the real caption's in
    `text_emb`, set after set (DataCompDR v1 and older mobiledistill datasets)."""
    text_emb, offset, out = arrays["text_emb"], 1, {}
    for key, captions in sets.items():
        if f"{key}_emb" in arrays:
            out[key] = arrays[f"{key}_emb"]
            if len(out[key]) != len(captions):
                raise ValueError(f"{len(captions)} captions in {key} but {len(out[key])} rows in {key}_emb")
        else:
            out[key] = text_emb[offset:offset + len(captions)]
            if len(out[key]) != len(captions):
                raise ValueError(f"{len(captions)} captions in {key} but only {len(out[key])} text embedding rows "
                                 "for them")
            offset += len(captions)
    return out


def _check_embeddings(arrays: dict[str, np.ndarray], dims: list[int] | None, num_views: int) -> None:
    """What a sample's embeddings must be for its views and captions to use them (ValueError otherwise)."""
    image_emb = arrays["image_emb"]
    width = image_emb.shape[1] if image_emb.ndim == 2 else None
    for name, values in arrays.items():
        if values.ndim != 2 or values.shape[1] != width:
            raise ValueError(f"{name} of shape {values.shape} is not (rows, D) like image_emb {image_emb.shape}")
    if dims is not None and width != sum(dims):
        raise ValueError(f"embedding dimension {width} is not the teachers' {sum(dims)}")
    if not len(image_emb) or num_views and num_views != len(image_emb):
        raise ValueError(f"{num_views} stored augmentations but {len(image_emb)} image embedding rows")
    if not len(arrays["text_emb"]):
        raise ValueError("text_emb has no row for the caption")
    if not all(np.isfinite(values).all() for values in arrays.values()):
        raise ValueError("embeddings are not finite")


def _embedding_member(raw: dict[str, Any]) -> tuple[str, bytes]:
    for ext in ("npz", "pth.gz"):
        if ext in raw:
            return ext, raw[ext]
    raise ValueError("no embeddings (npz or pth.gz)")


JOIN_LOOKAHEAD = 64  # image samples read ahead looking for a key before it counts as missing
JOIN_STASH = 1024  # image samples held at most while joining one shard


def pair_image_shards(shards: list[str], images: str | Path) -> dict[str, str]:
    """Embeddings shard -> its image shard among `images`: by file name when the names match (DataCompDR's shards
    carry the names of the DataComp shards they reinforce), else by position when the counts do (`reinforce`
    writes output shard n from input shard n). Names only: nothing is read."""
    image_urls = resolve_shards(str(images), split="train")  # a dataset root: its training split
    by_name = {basename(url): url for url in image_urls}
    if all(basename(url) in by_name for url in shards):
        return {url: by_name[basename(url)] for url in shards}
    if len(image_urls) == len(shards):
        return dict(zip(shards, image_urls))
    raise UserInputError(f"cannot pair the {len(shards)} embeddings shards with the {len(image_urls)} image shards "
                         f"of {images}: neither their names nor their counts match")


def join_images(raws: Iterator[dict[str, Any]], image_shard: str | None, skips: SkipLog) -> Iterator[dict[str, Any]]:
    """Give each embeddings-only sample of one shard the image, caption and metadata of the sample with its key in
    `image_shard`, read alongside it: in the same order, so memory stays bounded (a sample whose image does not
    come within `JOIN_LOOKAHEAD` samples is skipped and counted as missing). Samples with their own image pass."""
    images = iter_raw_samples([image_shard], skips) if image_shard else iter(())
    stash: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for raw in raws:
        if any(e in raw for e in IMAGE_EXTENSIONS):
            yield raw
            continue
        key = raw["__key__"]
        for _ in range(JOIN_LOOKAHEAD):
            if key in stash:
                break
            image = next(images, None)
            if image is None:
                break
            stash[image["__key__"]] = image
            if len(stash) > JOIN_STASH:
                stash.popitem(last=False)
        image = stash.pop(key, None)
        if image is None:
            where = f"in {basename(image_shard)}" if image_shard else "(no image shard of this name)"
            skips.skip_sample(key, f"no image: its key is not {where}", raw["__url__"])
            continue
        yield {**{k: v for k, v in image.items() if not k.startswith("__")}, **raw}


def parse_reinforced(raw: dict[str, Any], dims: list[int] | None) -> dict[str, Any]:
    """A raw reinforced sample checked and decoded, its image left undecoded: key, url, caption (or None),
    param_aug, image_emb (K, D) float32, caption_sets {key: (captions, embeddings (C_k, D))}, and the flat view
    of them every reader had before caption sets, syn_captions (all sets' captions in order) and text_emb
    (1 + C, D) (row 0 the real caption's), meta, and `source`, the raw sample itself when it holds an image (else
    None). ValueError with the reason when it is malformed."""
    ext, blob = _embedding_member(raw)
    arrays = decode_embedding_arrays(ext, blob, dims)
    param_aug = parse_param_aug(raw["paug.json"]) if "paug.json" in raw else []
    _check_embeddings(arrays, dims, len(param_aug))
    sets = parse_caption_sets(raw["syn.json"]) if "syn.json" in raw else {}
    set_embeddings = _caption_set_embeddings(sets, arrays)
    caption_sets = {key: (captions, set_embeddings[key]) for key, captions in sets.items()}
    text_emb = np.concatenate([arrays["text_emb"][:1], *set_embeddings.values()])
    return {"key": raw["__key__"], "url": raw["__url__"], "caption": _caption(raw) if "txt" in raw else None,
            "syn_captions": [c for captions in sets.values() for c in captions], "param_aug": param_aug,
            "image_emb": arrays["image_emb"], "text_emb": text_emb, "caption_sets": caption_sets,
            "meta": parse_metadata(raw["json"]) if "json" in raw else {},
            "source": raw if any(e in raw for e in IMAGE_EXTENSIONS) else None}


def reinforced_records(info: ReinforcedInfo, shards: list[str], skips: SkipLog,
                       image_shards: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """`parse_reinforced` records of `shards` (some of `info.shards`), joined shard by shard with their image
    shards when given (`pair_image_shards`); malformed samples are skipped and recorded in `skips`."""
    for url in shards:
        raws = iter_raw_samples([url], skips)
        if image_shards is not None:
            raws = join_images(raws, image_shards.get(url), skips)
        for raw in raws:
            try:
                yield parse_reinforced(raw, info.dims)
            except ValueError as e:
                skips.skip_sample(raw["__key__"], f"malformed reinforced sample: {e}", raw["__url__"])


def open_reinforced(path: str | Path, images: str | Path | None = None, skips: SkipLog | None = None,
                    decode_images: bool = True) -> Iterator[dict[str, Any]]:
    """Iterate a reinforced dataset's samples with dequantized float embeddings (see the module docstring).

    `images`: image-text shards to join by key, shard by shard (`join_images`). With `decode_images` off, samples
    carry their undecoded image-text sample as `image_source` (for `shards.decode_sample`) and `image` is None."""
    info = read_info(path)
    skips = skips if skips is not None else SkipLog()
    image_shards = pair_image_shards(info.shards, images) if images is not None else None
    for record in reinforced_records(info, info.shards, skips, image_shards):
        key, source, caption = record["key"], record["source"], record["caption"]
        image, image_bytes = None, b""
        try:
            if source is not None and not decode_images:
                caption = _caption(source) if "txt" in source else caption
            elif source is not None:
                decoded = decode_sample(source)
                image, caption, image_bytes = decoded.image, decoded.caption, decoded.image_bytes
        except ValueError as e:
            skips.skip_sample(key, str(e), record["url"])
            continue
        yield {"key": key, "image": image, "caption": caption, "syn_captions": record["syn_captions"],
               "caption_sets": {k: len(captions) for k, (captions, _) in record["caption_sets"].items()},
               "param_aug": record["param_aug"], "image_emb": torch.from_numpy(record["image_emb"]),
               "text_emb": torch.from_numpy(record["text_emb"]), "image_bytes": image_bytes, "meta": record["meta"],
               **({} if decode_images else {"image_source": source})}


def _caption(raw: dict[str, Any]) -> str:
    try:
        return raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError("caption is not UTF-8") from e
