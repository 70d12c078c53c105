"""Incremental reinforcement: add one captioner's captions, or one teacher's embeddings, to a finished dataset.

    reinforce --add-to DR_DIR --captioner SPEC:TAG   a caption set `syn_text_<TAG>` per sample, and its embeddings
                                                     by every stored teacher (`syn_text_<TAG>_emb`)
    reinforce --add-to DR_DIR --teacher SPEC         the teacher's embeddings of every stored view (replayed from
                                                     `paug.json`) and of every stored caption, appended as columns

Nothing else is recomputed, and every stored value keeps its bytes: image-view embeddings, captions, their
embeddings, int8 codes and scales (a new teacher's columns get scales of their own). A teacher with another
tokenizer or resolution works, as every teacher sees the stored views at its own size.

Shard by shard, resumable: each shard's extended version is written beside it (`.NAME.extended`) and only when
every shard has one are they renamed over the originals and `config.json` updated, last. Until then the dataset
carries `extend_run.json` and readers refuse it as being extended; running the same command again finishes it.
"""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mdcore.atomic import hidden_temporary, write_json_atomic
from mdcore.errors import UserInputError
from mdcore.jsonio import read_json_file
from mdcore.locks import hold_directory, remove_temporaries
from mdcore.names import EXTEND_RUN, REINFORCE_RUN, REINFORCED_CONFIG, SHARD_STATS_SUFFIX
from mdcore.processes import process_state
from reinforced_data.augment import replay_augmentation
from reinforced_data.reader import join_images, pair_image_shards, parse_caption_sets, parse_param_aug, read_info
from reinforced_data.shards import IMAGE_EXTENSIONS, SkipLog, decode_sample, iter_raw_samples, open_tar_writer
from reinforced_data.storage import quantize_int8, read_arrays, write_arrays
from teachers.captioner import load_captioner
from teachers.reinforce import caption_seed, caption_set_key, parse_captioner
from teachers.teacher import load_ensemble, load_teacher

__all__ = ["extend_reinforced"]

_EXTENDED = ".extended"


def _embedding_member(raw: dict[str, Any]) -> str:
    return "npz" if "npz" in raw else "pth.gz"


def _stored(values: np.ndarray, arrays: dict, name: str, dims: list[int], dtype: str) -> None:
    """Put float embeddings `values` (rows, sum dims) into `arrays` under `name` in the dataset's storage dtype."""
    if dtype == "bf16":
        arrays[name] = torch.from_numpy(np.ascontiguousarray(values)).to(torch.bfloat16)
    elif dtype == "int8":
        arrays[name], arrays[f"{name}_scale"] = quantize_int8(values, dims)
    else:
        arrays[name] = values.astype(np.float32 if dtype == "fp32" else np.float16)


def _appended(arrays: dict, name: str, columns: np.ndarray, dim: int, dtype: str) -> None:
    """Append a new teacher's columns (rows, dim) to the stored array `name`, the stored columns untouched."""
    old = arrays[name]
    if dtype == "bf16":
        arrays[name] = torch.cat([old, torch.from_numpy(np.ascontiguousarray(columns)).to(torch.bfloat16)], dim=1)
    elif dtype == "int8":
        codes, scale = quantize_int8(columns, [dim])
        arrays[name] = np.concatenate([old, codes], axis=1)
        arrays[f"{name}_scale"] = np.concatenate([arrays[f"{name}_scale"], scale], axis=1)
    else:
        arrays[name] = np.concatenate([old, columns.astype(old.dtype)], axis=1)


class _Extension:
    """What one `--add-to` run adds to each sample of a shard."""

    def __init__(self, config: dict[str, Any], info, device, captioner_spec: str | None, teacher_spec: str | None,
                 num_captions: int, compile_step: bool = False):
        self.config, self.info, self.dtype = config, info, config["dtype"]
        self.dims = [int(t["dim"]) for t in config["teachers"]]
        self.seed = int(config["seed"])
        self.num_captions = num_captions
        self.sampling = config.get("caption_sampling", {"top_p": 0.9, "max_len": 24})
        existing = {s["key"] for s in config.get("caption_sets", [])} | {"syn_text"}
        if captioner_spec is not None:
            spec, tag = parse_captioner(captioner_spec)
            if tag is None:
                raise UserInputError("--add-to --captioner needs a tag: --captioner SPEC:TAG")
            self.key = caption_set_key(tag)
            if self.key in existing:
                raise UserInputError(f"caption set {self.key} is already in the dataset: pick another tag")
            self.captioner = load_captioner(spec, device=device, compile_step=compile_step)
            self.ensemble = load_ensemble([t["spec"] for t in config["teachers"]], device=device)
            self.teacher = None
        else:
            if teacher_spec in {t["spec"] for t in config["teachers"]}:
                raise UserInputError(f"teacher {teacher_spec} is already in the dataset")
            self.teacher = load_teacher(teacher_spec, device=device)
            if str(self.teacher.spec) in {t["spec"] for t in config["teachers"]}:
                raise UserInputError(f"teacher {self.teacher.spec} is already in the dataset")
            self.captioner = None

    def signature(self) -> dict[str, Any]:
        if self.captioner is not None:
            return {"op": "captioner", "spec": str(self.captioner.spec), "key": self.key,
                    "captions": self.num_captions, "compiled": self.captioner.compile_step}
        return {"op": "teacher", "spec": str(self.teacher.spec)}

    def done(self, raw: dict[str, Any]) -> bool:
        """Whether a stored sample already holds this extension (a shard renamed before a kill)."""
        if self.captioner is not None:
            return "syn.json" in raw and self.key in parse_caption_sets(raw["syn.json"])
        arrays = read_arrays(_embedding_member(raw), raw[_embedding_member(raw)])
        return arrays["image_emb"].shape[1] == sum(self.dims) + self.teacher.dim

    def extend(self, batch: list[tuple[dict[str, Any], Any]]) -> list[dict[str, Any]]:
        """The extended raw samples of a batch of (raw sample, its decoded image-text sample)."""
        return self._captions(batch) if self.captioner is not None else self._teacher(batch)

    def _captions(self, batch):
        images = [decoded.image for _, decoded in batch]
        seeds = [caption_seed(self.seed, raw["__key__"], self.key) for raw, _ in batch]
        captions = self.captioner.generate(images, self.num_captions, seeds, top_p=self.sampling["top_p"],
                                           max_len=self.sampling["max_len"])
        embeddings = self.ensemble.encode_texts([c for row in captions for c in row]).numpy()  # (B * C, D)
        out = []
        for n, (raw, _) in enumerate(batch):
            sets = json.loads(raw["syn.json"]) if "syn.json" in raw else {}
            sets[self.key] = captions[n]
            ext = _embedding_member(raw)
            arrays = read_arrays(ext, raw[ext])
            rows = embeddings[n * self.num_captions:(n + 1) * self.num_captions]
            _stored(rows, arrays, f"{self.key}_emb", self.dims, self.dtype)
            out.append({**raw, "syn.json": json.dumps(sets).encode(), ext: write_arrays(ext, arrays)})
        return out

    def _teacher(self, batch):
        teacher, augmentation = self.teacher, self.info.augmentation
        out = []
        for raw, decoded in batch:
            ext = _embedding_member(raw)
            arrays = read_arrays(ext, raw[ext])
            params = parse_param_aug(raw["paug.json"]) if "paug.json" in raw else []
            views = torch.stack([replay_augmentation(decoded.image, p, augmentation) for p in params])
            _appended(arrays, "image_emb", teacher.encode_image_tensors(views).cpu().numpy(), teacher.dim,
                      self.dtype)
            sets = parse_caption_sets(raw["syn.json"]) if "syn.json" in raw else {}
            in_text_emb = [decoded.caption] + [c for key, captions in sets.items() if f"{key}_emb" not in arrays
                                               for c in captions]  # the older layout keeps them in text_emb
            for name, texts in [("text_emb", in_text_emb)] + [(f"{k}_emb", v) for k, v in sets.items()
                                                              if f"{k}_emb" in arrays]:
                if texts:
                    _appended(arrays, name, teacher.encode_texts(texts).cpu().numpy(), teacher.dim, self.dtype)
            out.append({**raw, ext: write_arrays(ext, arrays)})
        return out

    def updated_config(self) -> dict[str, Any]:
        config = dict(self.config)
        if self.captioner is not None:
            config["captioners"] = [*config.get("captioners", []), str(self.captioner.spec)]
            config["caption_sets"] = [*config.get("caption_sets", []), {
                "key": self.key, "captioner": str(self.captioner.spec), "captions": self.num_captions}]
        else:
            record = {"spec": str(self.teacher.spec), "dim": self.teacher.dim, "logit_scale": self.teacher.logit_scale}
            config["teachers"] = [*config["teachers"], record]
            config["model_name"] = config["pretrained"] = ",".join(t["spec"] for t in config["teachers"])
        return config


def _batches(shard: str, image_shard: str | None, size: int, skips: SkipLog) -> Iterator[list]:
    """(raw sample as stored, decoded image-text sample) pairs of one shard, images joined from `image_shard` when
    the shard stores none (`join_images`); a sample whose image cannot be had comes with None."""
    raws = iter_raw_samples([shard], skips)
    if image_shard is not None:
        raws = join_images(raws, image_shard, skips)
    batch = []
    for joined in raws:
        stored = joined if image_shard is None else {k: v for k, v in joined.items() if k not in IMAGE_EXTENSIONS}
        try:
            decoded = decode_sample(joined)
        except ValueError as e:
            skips.skip_sample(joined["__key__"], f"kept without the addition: {e}", shard)
            decoded = None
        batch.append((stored, decoded))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_extended(shard: Path, image_shard: str | None, extension: _Extension, batch_size: int,
                    bar: tqdm) -> None:
    """Write shard's extended version beside it, atomically, as `.NAME.extended`."""
    target = shard.with_name(f".{shard.name}{_EXTENDED}")
    tmp = hidden_temporary(target)
    skips = SkipLog()
    with open_tar_writer(tmp) as sink:
        for batch in _batches(str(shard), image_shard, batch_size, skips):
            usable = [(raw, decoded) for raw, decoded in batch if decoded is not None]
            extended = {raw["__key__"]: new for (raw, _), new in zip(usable, extension.extend(usable))}
            for raw, _ in batch:
                record = extended.get(raw["__key__"], raw)
                sink.write({k: v for k, v in record.items() if k != "__url__"})
            bar.update(len(batch))
    os.replace(tmp, target)


def extend_reinforced(dataset: str | Path, captioner: str | None = None, teacher: str | None = None,
                      num_captions: int = 5, images: str | None = None, batch_size: int = 64,
                      progress: bool = True, compile_step: bool = False) -> dict[str, Any]:
    """Add `captioner`'s captions (`SPEC:TAG`) or `teacher`'s embeddings to the finished reinforced dataset
    `dataset` (see the module docstring); returns its updated config.json."""
    if (captioner is None) == (teacher is None):
        raise UserInputError("--add-to adds one --captioner SPEC:TAG or one --teacher SPEC")
    if captioner is not None and not 0 < num_captions <= 1024:
        raise UserInputError("--num-captions must be in [1, 1024] to add a captioner")
    root = Path(dataset)
    if not root.is_dir() or not (root / REINFORCED_CONFIG).is_file():
        if (root / REINFORCE_RUN).is_file():
            raise UserInputError(f"{root} is an unfinished reinforced dataset (finish it with reinforce first)")
        raise UserInputError(f"{root} is not a reinforced dataset (no {REINFORCED_CONFIG})")
    config = read_json_file(root / REINFORCED_CONFIG)
    if config.get("format") != "mobiledistill":
        raise UserInputError(f"{root} was not written by mobiledistill reinforce: its teachers and storage are not "
                             "known well enough to extend it")
    state = process_state()
    with hold_directory(root):
        run_file = root / EXTEND_RUN
        pending = read_json_file(run_file) if run_file.is_file() else None
        info = read_info(root, allow_extending=True)
        extension = _Extension(config, info, state.device, captioner, teacher, num_captions, compile_step)
        if pending is not None and pending != extension.signature():
            raise UserInputError(f"{root} is being extended by another --add-to ({pending.get('op')} "
                                 f"{pending.get('spec')}): run that one again to finish it first")
        write_json_atomic(run_file, extension.signature())
        remove_temporaries(root)
        image_shards = pair_image_shards(info.shards, images) if images else {}
        shards = [Path(s) for s in info.shards]
        start = time.time()
        with tqdm(total=config.get("counts", {}).get("samples"), desc="add-to", unit="sample",
                  disable=not progress, dynamic_ncols=True) as bar:
            for shard in shards:
                extended = shard.with_name(f".{shard.name}{_EXTENDED}")
                first = next(iter_raw_samples([str(shard)]), None)
                if extended.is_file() or first is None or extension.done(first):
                    continue
                _write_extended(shard, image_shards.get(str(shard)), extension, batch_size, bar)
        for shard in shards:  # every shard has its extended version: they replace the originals
            extended = shard.with_name(f".{shard.name}{_EXTENDED}")
            if extended.is_file():
                os.replace(extended, shard)
            stats_path = shard.with_suffix(SHARD_STATS_SUFFIX)
            if stats_path.is_file():
                stats = read_json_file(stats_path)
                stats["bytes"] = shard.stat().st_size
                write_json_atomic(stats_path, stats)
        updated = extension.updated_config()
        total = sum(s.stat().st_size for s in shards)
        counts = dict(updated.get("counts", {}))
        counts.update(bytes=total, bytes_per_sample=total / max(1, counts.get("samples", 1)))
        updated["counts"] = counts
        updated["extensions"] = [*config.get("extensions", []), {**extension.signature(),
                                                                  "wall_s": round(time.time() - start, 2)}]
        write_json_atomic(root / REINFORCED_CONFIG, updated)  # last: the dataset is whole again
        run_file.unlink()
        return updated

