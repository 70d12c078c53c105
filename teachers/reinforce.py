"""Writing reinforced datasets (MobileCLIP's multi-modal dataset reinforcement, DataCompDR's layout).

For every input sample: K augmentations are drawn (from (seed, key) alone) and stored as parameters; each augmented
view is embedded by every teacher; each captioner (`--captioner SPEC[:TAG]`) writes C synthetic captions, a caption
set `syn_text_<TAG>` in `syn.json` with their embeddings by every teacher under `syn_text_<TAG>_emb` (Apple's newer
DataCompDR layout; one untagged captioner writes `syn_text`); the real caption's embeddings are `text_emb`. All of
it is written next to the sample. Teachers then cost nothing at training time.

Work is split by input shard: input shard n becomes output shard n, written under a temporary name and renamed
when complete, with its counts beside it. A killed run started again with the same arguments redoes only the
shards that are missing; `config.json`, written last by one process, marks the dataset complete. Under
`accelerate launch` process r takes shards r, r + N, ...
"""

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mdcore.atomic import hidden_temporary, write_json_atomic
from mdcore.configs import check_choice, check_range, check_types
from mdcore.errors import UserInputError
from mdcore.jsonio import read_json_file
from mdcore.locks import hold_directory
from mdcore.names import SHARD_STATS_SUFFIX
from mdcore.processes import process_state
from reinforced_data.augment import (
    AugmentationConfig,
    augmentation_generator,
    replay_augmentation,
    sample_augmentation,
)
from reinforced_data.pipeline import default_num_workers, make_loader
from reinforced_data.reader import MAX_CAPTIONS, MAX_VIEWS
from reinforced_data.shards import ImageTextSample, SkipLog, iter_image_text, open_tar_writer, resolve_shards
from reinforced_data.storage import STORAGE_DTYPES, encode_embeddings
from teachers.captioner import GROUP, load_captioner
from teachers.teacher import load_ensemble

__all__ = ["ReinforceConfig", "reinforce", "caption_seed", "parse_captioner", "caption_set_key", "caption_set_keys",
           "CONFIG_NAME"]

CONFIG_NAME = "config.json"
_RUN_NAME = "reinforce_run.json"  # the arguments of an unfinished run, so a restart can check they match


@dataclass
class ReinforceConfig:
    num_augs: int = 10
    num_captions: int = 5
    dtype: str = "fp16"
    seed: int = 0
    batch_size: int = 256  # augmented views per teacher forward pass
    store_images: bool = True  # False writes embeddings only (training then joins images by __key__)
    top_p: float = 0.9
    caption_max_len: int = 24  # tokens per synthetic caption, start and end included
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    num_workers: int | None = None  # data workers per process (None: the cores per process less one; 0: in-process)
    compile_captioners: bool = False  # decode with the torch.compile'd step (teachers.coca_decoding)

    def __post_init__(self):
        check_types(self)
        check_range("num_augs", self.num_augs, 1, MAX_VIEWS)
        check_range("num_captions", self.num_captions, 0, MAX_CAPTIONS)
        check_choice("dtype", self.dtype, STORAGE_DTYPES)
        check_range("seed", self.seed, 0, 2**63 - 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("top_p", self.top_p, 0, 1)
        check_range("caption_max_len", self.caption_max_len, 3, 1024)
        check_range("num_workers", self.num_workers, 0, 64)


def caption_seed(seed: int, key: str, caption_set: str) -> int:
    """The seed of one sample's captions by one captioner: a function of (seed, sample key, caption set) alone."""
    digest = hashlib.sha256(f"{seed}\x1fcaption\x1f{caption_set}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 62) - 1)


_TAG = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def parse_captioner(text: str) -> tuple[str, str | None]:
    """`SPEC[:TAG]` -> (spec, tag or None). The tag is what follows the last `:` when that is a plain name (letters,
    digits, `_`, `-`); specs themselves may hold colons (`local-dir:PATH`, `hf-hub:ORG/REPO`)."""
    spec, sep, tag = text.rpartition(":")
    if sep and spec and spec not in ("local-dir", "hf-hub") and _TAG.match(tag):
        return spec, tag
    return text, None


def caption_set_key(tag: str | None) -> str:
    """The `syn.json` key of a captioner's captions (Apple's newer layout): `syn_text_<tag>`, or `syn_text`."""
    return f"syn_text_{tag}" if tag else "syn_text"


def caption_set_keys(captioners: Sequence[str]) -> list[str]:
    """Each `--captioner SPEC[:TAG]`'s caption-set key; a `UserInputError` for untagged captioners among several
    or a tag used twice."""
    tags = [parse_captioner(c)[1] for c in captioners]
    if len(captioners) > 1 and None in tags:
        raise UserInputError("with several captioners give each a tag: --captioner SPEC:TAG")
    keys = [caption_set_key(t) for t in tags]
    if len(set(keys)) != len(keys):
        raise UserInputError(f"captioner tag used twice: {', '.join(k for k in keys if keys.count(k) > 1)}")
    return keys


def _shard_name(index: int) -> str:
    return f"{index:05d}.tar"


@dataclass
class _ShardViews:
    """A batch of one input shard's samples with their K augmentations drawn and replayed, as a data worker makes
    it; the last batch of a shard (perhaps empty) says so and carries what the shard skipped."""

    shard: int  # the input (and output) shard's index
    url: str
    last: bool
    samples: list[ImageTextSample]  # without their decoded image: teachers get `views`, captioners pixels
    params: list[list]  # (B, K) stored augmentations
    views: torch.Tensor  # (B * K, 3, S, S) in [0, 1]
    caption_pixels: list[torch.Tensor]  # per captioner, (B, 3, H, W) in its own preprocessing
    skips: SkipLog | None = None

    def pin_memory(self) -> "_ShardViews":
        return dataclasses.replace(self, views=self.views.pin_memory(),
                                   caption_pixels=[p.pin_memory() for p in self.caption_pixels])


class _InputShards(torch.utils.data.IterableDataset):
    """This process's input shards dealt to the DataLoader workers, whole: each worker decodes its shards' samples
    and replays their augmentations, which depend on (seed, key) alone, so an output shard's content does not
    depend on the number of workers."""

    def __init__(self, todo: list[tuple[int, str]], config: "ReinforceConfig", caption_transforms: list):
        super().__init__()
        self.todo, self.config, self.caption_transforms = todo, config, caption_transforms
        self.samples_per_batch = max(1, config.batch_size // config.num_augs)
        if caption_transforms:  # whole groups of the captioner's fixed shape: no padded rows but a shard's last
            self.samples_per_batch = max(GROUP, self.samples_per_batch - self.samples_per_batch % GROUP)

    def __iter__(self) -> Iterator[_ShardViews]:
        info = torch.utils.data.get_worker_info()
        mine = self.todo[info.id::info.num_workers] if info else self.todo
        for n, url in mine:
            skips, batch = SkipLog(), []
            for sample in iter_image_text([url], skips):
                batch.append(sample)
                if len(batch) == self.samples_per_batch:
                    yield self._prepare(n, url, batch)
                    batch = []
            yield self._prepare(n, url, batch, skips)

    def _prepare(self, n: int, url: str, samples: list[ImageTextSample], skips: SkipLog | None = None
                 ) -> _ShardViews:
        cfg = self.config
        params, views = [], []
        for s in samples:
            g = augmentation_generator(cfg.seed, s.key)
            sample_params = [sample_augmentation(s.image.width, s.image.height, cfg.augmentation, g)
                             for _ in range(cfg.num_augs)]
            params.append(sample_params)
            views.extend(replay_augmentation(s.image, p, cfg.augmentation) for p in sample_params)
        pixels = [torch.stack([t(s.image) for s in samples]) if samples else torch.zeros(0)
                  for t in self.caption_transforms]
        samples = [dataclasses.replace(s, image=None) for s in samples]  # decoded pixels need not cross processes
        return _ShardViews(n, url, skips is not None, samples, params,
                           torch.stack(views) if views else torch.zeros(0), pixels, skips)


class _ShardWriter:
    """Embeds a batch of samples with the teachers and captioners; the records of its output shard."""

    def __init__(self, ensemble, captioners, config: ReinforceConfig, set_keys: Sequence[str] = ()):
        self.ensemble, self.captioners, self.config = ensemble, captioners, config
        self.set_keys = list(set_keys)  # one caption set per captioner, `config.num_captions` captions each

    def encode(self, prepared: _ShardViews) -> list[dict[str, Any]]:
        """Embed prepared views and captions with every teacher; the records of the output shard."""
        cfg = self.config
        samples, params = prepared.samples, prepared.params
        image_emb = self.ensemble.encode_image_tensors(prepared.views).numpy()  # (B*K, D)

        sets: list[dict[str, list[str]]] = [{} for _ in samples]
        for c, (captioner, key) in enumerate(zip(self.captioners, self.set_keys)):
            seeds = [caption_seed(cfg.seed, s.key, key) for s in samples]
            for row, captions in zip(sets, captioner.generate(prepared.caption_pixels[c], cfg.num_captions, seeds,
                                                              top_p=cfg.top_p, max_len=cfg.caption_max_len)):
                row[key] = captions
        texts = [t for s, row in zip(samples, sets) for t in [s.caption, *(c for v in row.values() for c in v)]]
        text_emb = self.ensemble.encode_texts(texts).numpy()  # (B * (1 + C * captioners), D)

        out = []
        k, c, per_sample = cfg.num_augs, cfg.num_captions, 1 + cfg.num_captions * len(self.set_keys)
        for n, s in enumerate(samples):
            rows = text_emb[n * per_sample:(n + 1) * per_sample]  # the real caption's, then each set's
            extra = {f"{key}_emb": rows[1 + i * c:1 + (i + 1) * c] for i, key in enumerate(self.set_keys)}
            ext, blob = encode_embeddings(image_emb[n * k:(n + 1) * k], rows[:1], cfg.dtype, self.ensemble.dims,
                                          extra)
            record = {
                "__key__": s.key,
                "txt": s.caption,
                "json": json.dumps({"uid": s.key, "sha256": hashlib.sha256(s.image_bytes).hexdigest()}),
                # a JSON string inside the JSON, as in Apple's released shards
                "paug.json": json.dumps({"param_aug": json.dumps(params[n])}),
                "syn.json": json.dumps(sets[n]),
                ext: blob,
            }
            if cfg.store_images:
                record[s.image_ext] = s.image_bytes
            out.append(record)
        return out


class _OpenShard:
    """An output shard being written under its hidden temporary name; `finish` publishes it."""

    def __init__(self, out_path: Path, url: str):
        self.out_path, self.url, self.tmp = out_path, url, hidden_temporary(out_path)
        self.sink = open_tar_writer(self.tmp)
        self.written = 0

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.sink.write(record)
        self.written += len(records)

    def finish(self, skips: SkipLog) -> None:
        self.sink.close()
        stats = {"shard": self.out_path.name, "source": self.url, "samples": self.written,
                 "bytes": self.tmp.stat().st_size, "skipped": skips.samples, "unreadable": skips.shards}
        write_json_atomic(self.out_path.with_suffix(SHARD_STATS_SUFFIX), stats)
        os.replace(self.tmp, self.out_path)  # the tar appears last: a listed tar is always complete


def _write_shards(todo: list[tuple[int, str]], out_dir: Path, writer: _ShardWriter, num_workers: int, bar: tqdm,
                  pin_memory: bool) -> None:
    """Write the output shards of `todo`: views made in `num_workers` DataLoader workers (each takes whole input
    shards), teachers and captioners in this process, as many shards open at once as there are workers."""
    dataset = _InputShards(todo, writer.config, [c.preprocess for c in writer.captioners])
    open_shards: dict[int, _OpenShard] = {}
    for prepared in make_loader(dataset, num_workers, writer.config.seed, pin_memory=pin_memory):
        if prepared.shard not in open_shards:
            open_shards[prepared.shard] = _OpenShard(out_dir / _shard_name(prepared.shard), prepared.url)
        if prepared.samples:
            open_shards[prepared.shard].write(writer.encode(prepared))
            bar.update(len(prepared.samples))
        if prepared.last:
            open_shards.pop(prepared.shard).finish(prepared.skips)


def _run_signature(data: str, urls: list[str], teachers: Sequence[str], captioners: Sequence[str],
                   config: ReinforceConfig) -> dict[str, Any]:
    cfg = asdict(config)
    cfg.pop("batch_size")  # results depend on neither
    cfg.pop("num_workers")
    signature = {"data": data, "shards": urls, "teachers": list(teachers), "captioners": list(captioners),
                 "config": cfg}
    return json.loads(json.dumps(signature))  # as it reads back from disk (tuples become lists)


def reinforce(data: str, teachers: Sequence[str], out_dir: str | Path, config: ReinforceConfig,
              captioners: Sequence[str] = (), split: str = "train", progress: bool = True) -> dict[str, Any]:
    """Write a reinforced dataset of `data` to `out_dir` (resuming an unfinished run); returns its config.json."""
    if not teachers:
        raise UserInputError("give at least one --teacher")
    config.__post_init__()  # fields may have been changed since construction
    if config.num_captions > 0 and not captioners:
        raise UserInputError("--num-captions needs a --captioner (or pass --num-captions 0)")
    set_keys = caption_set_keys(captioners) if config.num_captions > 0 else []
    out_dir = Path(out_dir)
    if (out_dir / CONFIG_NAME).is_file():
        raise UserInputError(f"{out_dir} is already a finished reinforced dataset (delete it to redo)")
    urls = resolve_shards(data, split)
    state = process_state()
    # One run at a time on out_dir: a second is refused at once, and temporaries are only ever removed by the
    # run that owns the directory (those of a killed run, by the next one).
    with hold_directory(out_dir, enabled=state.is_main_process):
        if (out_dir / CONFIG_NAME).is_file():  # finished while this run waited to start
            raise UserInputError(f"{out_dir} is already a finished reinforced dataset (delete it to redo)")
        ensemble = load_ensemble(teachers, device=state.device)  # a bad spec fails before anything is written
        caps = [load_captioner(parse_captioner(c)[0], device=state.device,
                               compile_step=config.compile_captioners)
                for c in captioners]
        signature = _run_signature(str(data), urls, teachers, captioners, config)
        run_file = out_dir / _RUN_NAME
        if state.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            if run_file.is_file() and read_json_file(run_file) != signature:
                raise UserInputError(f"{out_dir} holds an unfinished run with other arguments (delete it to start "
                                     "over)")
            run_file.write_text(json.dumps(signature, indent=2))
            for stale in out_dir.glob(".*.tmp-*"):  # left by a killed run; never taken for output
                stale.unlink()
        state.wait_for_everyone()

        writer = _ShardWriter(ensemble, caps if set_keys else [], config, set_keys)
        mine = [(n, url) for n, url in enumerate(urls) if n % state.num_processes == state.process_index]
        todo = [(n, url) for n, url in mine if not (out_dir / _shard_name(n)).is_file()]
        workers = min(len(todo), default_num_workers() if config.num_workers is None else config.num_workers)
        start = time.time()
        with tqdm(desc=f"reinforce [{state.process_index}]", unit="sample", disable=not progress, dynamic_ncols=True,
                  position=state.process_index) as bar:
            _write_shards(todo, out_dir, writer, workers, bar, pin_memory=state.device.type == "cuda")
        state.wait_for_everyone()

        if not state.is_main_process:
            return {}
        shard_stats = []
        for n in range(len(urls)):
            stats_path = (out_dir / _shard_name(n)).with_suffix(".stats.json")
            shard_stats.append(read_json_file(stats_path))
        samples = sum(s["samples"] for s in shard_stats)
        nbytes = sum(s["bytes"] for s in shard_stats)
        skipped = [s for st in shard_stats for s in st["skipped"]]
        unreadable = [s for st in shard_stats for s in st["unreadable"]]
        skips = SkipLog()
        for entry in skipped:
            skips.skip_sample(entry["key"], entry["reason"], entry.get("shard"))
        for entry in unreadable:
            skips.skip_shard(entry["shard"], entry["reason"])
        cfg = {
            # DataCompDR's keys
            "model_name": ",".join(str(t.spec) for t in ensemble.teachers),
            "pretrained": ",".join(str(t.spec) for t in ensemble.teachers),
            "num_samples": config.num_augs,
            "reinforce": {"image_augmentation": config.augmentation.to_config()},
            # ours
            "format": "mobiledistill",
            "teachers": [{"spec": str(t.spec), "dim": t.dim, "logit_scale": t.logit_scale} for t in ensemble.teachers],
            "captioners": [str(c.spec) for c in caps],
            "caption_sets": [{"key": key, "captioner": str(c.spec), "captions": config.num_captions}
                             for key, c in zip(set_keys, caps)],
            "num_augs": config.num_augs,
            "num_captions": config.num_captions,
            "caption_sampling": {"top_p": config.top_p, "max_len": config.caption_max_len,
                                 "compiled": config.compile_captioners},
            "dtype": config.dtype,
            "seed": config.seed,
            "store_images": config.store_images,
            "source": str(data),
            "shards": [_shard_name(n) for n in range(len(urls))],
            "counts": {"samples": samples, "skipped": len(skipped), "unreadable_shards": len(unreadable),
                       "bytes": nbytes, "bytes_per_sample": nbytes / max(1, samples)},
            "skipped": skipped + [{"key": u["shard"], "reason": u["reason"]} for u in unreadable],
            "skips": skips.as_dict(),
            "wall_s": round(time.time() - start, 2),
        }
        write_json_atomic(out_dir / CONFIG_NAME, cfg)
        run_file.unlink(missing_ok=True)
        return cfg

