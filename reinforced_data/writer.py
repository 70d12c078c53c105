"""Writing reinforced datasets (MobileCLIP's multi-modal dataset reinforcement, DataCompDR's layout).

For every input sample: K augmentations are drawn (from (seed, key) alone) and stored as parameters; each augmented
view is embedded by every teacher; the real caption and C synthetic captions from the captioners are embedded by
every teacher; all of it is written next to the sample. Teachers then cost nothing at training time.

Work is split by input shard: input shard n becomes output shard n, written under a temporary name and renamed
when complete, with its counts beside it. A killed run started again with the same arguments redoes only the
shards that are missing; `config.json`, written last by one process, marks the dataset complete. Under
`accelerate launch` process r takes shards r, r + N, ...
"""

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any

import torch
from tqdm import tqdm

from mdcore.atomic import hidden_temporary, write_json_atomic
from mdcore.configs import check_choice, check_range, check_types
from mdcore.errors import UserInputError
from mdcore.jsonio import read_json_file
from mdcore.locks import hold_directory
from reinforced_data.augment import (
    AugmentationConfig,
    augmentation_generator,
    replay_augmentation,
    sample_augmentation,
)
from reinforced_data.reader import MAX_CAPTIONS, MAX_VIEWS
from reinforced_data.shards import ImageTextSample, SkipLog, iter_image_text, open_tar_writer, resolve_shards
from reinforced_data.storage import STORAGE_DTYPES, encode_embeddings

__all__ = ["ReinforceConfig", "reinforce", "caption_seed", "CONFIG_NAME"]

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

    def __post_init__(self):
        check_types(self)
        check_range("num_augs", self.num_augs, 1, MAX_VIEWS)
        check_range("num_captions", self.num_captions, 0, MAX_CAPTIONS)
        check_choice("dtype", self.dtype, STORAGE_DTYPES)
        check_range("seed", self.seed, 0, 2**63 - 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("top_p", self.top_p, 0, 1)
        check_range("caption_max_len", self.caption_max_len, 3, 1024)


def caption_seed(seed: int, key: str, captioner_index: int) -> int:
    digest = hashlib.sha256(f"{seed}\x1fcaption\x1f{captioner_index}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 62) - 1)


def _shard_name(index: int) -> str:
    return f"{index:05d}.tar"


def _captions_per_captioner(num_captions: int, num_captioners: int) -> list[int]:
    """C captions shared among captioners: the first ones take the remainder."""
    if num_captioners == 0:
        return []
    base, extra = divmod(num_captions, num_captioners)
    return [base + (i < extra) for i in range(num_captioners)]


class _ShardWriter:
    """Embeds a batch of samples with the teachers and captioners and writes them to one output tar."""

    def __init__(self, ensemble, captioners, config: ReinforceConfig):
        self.ensemble, self.captioners, self.config = ensemble, captioners, config
        self.per_captioner = _captions_per_captioner(config.num_captions, len(captioners))

    def prepare(self, samples: list[ImageTextSample]) -> tuple[list[ImageTextSample], list, torch.Tensor]:
        """Draw every sample's K augmentations and replay them: (samples, params, views (B*K, 3, S, S))."""
        cfg = self.config
        params, views = [], []
        for s in samples:
            g = augmentation_generator(cfg.seed, s.key)
            sample_params = [sample_augmentation(s.image.width, s.image.height, cfg.augmentation, g)
                             for _ in range(cfg.num_augs)]
            params.append(sample_params)
            views.extend(replay_augmentation(s.image, p, cfg.augmentation) for p in sample_params)
        return samples, params, torch.stack(views)

    def encode(self, samples: list[ImageTextSample], params: list, views: torch.Tensor) -> list[dict[str, Any]]:
        """Embed prepared views and captions with every teacher; the records of the output shard."""
        cfg = self.config
        image_emb = self.ensemble.encode_image_tensors(views).numpy()  # (B*K, D)

        synthetic: list[list[str]] = [[] for _ in samples]
        for c, (captioner, count) in enumerate(zip(self.captioners, self.per_captioner)):
            if count == 0:
                continue
            seeds = [caption_seed(cfg.seed, s.key, c) for s in samples]
            for row, captions in zip(synthetic, captioner.generate([s.image for s in samples], count, seeds,
                                                                   top_p=cfg.top_p, max_len=cfg.caption_max_len)):
                row.extend(captions)
        texts = [t for s, syn in zip(samples, synthetic) for t in [s.caption, *syn]]
        text_emb = self.ensemble.encode_texts(texts).numpy()  # (B*(1+C), D)

        out = []
        k, c1 = cfg.num_augs, 1 + cfg.num_captions
        for n, s in enumerate(samples):
            ext, blob = encode_embeddings(image_emb[n * k:(n + 1) * k], text_emb[n * c1:(n + 1) * c1], cfg.dtype,
                                          self.ensemble.dims)
            record = {
                "__key__": s.key,
                "txt": s.caption,
                "json": json.dumps({"uid": s.key, "sha256": hashlib.sha256(s.image_bytes).hexdigest()}),
                # a JSON string inside the JSON, as in Apple's released shards
                "paug.json": json.dumps({"param_aug": json.dumps(params[n])}),
                "syn.json": json.dumps({"syn_text": synthetic[n]}),
                ext: blob,
            }
            if cfg.store_images:
                record[s.image_ext] = s.image_bytes
            out.append(record)
        return out


def _process_shard(url: str, out_path: Path, writer: _ShardWriter, bar: tqdm) -> dict[str, Any]:
    """Write one output shard atomically; returns its counts and skipped samples."""
    skips = SkipLog()
    tmp = hidden_temporary(out_path)
    written = 0
    samples_per_batch = max(1, writer.config.batch_size // max(1, writer.config.num_augs))
    with open_tar_writer(tmp) as sink:
        for prepared in _prefetch(_prepared_batches(url, writer, samples_per_batch, skips)):
            for record in writer.encode(*prepared):
                sink.write(record)
                written += 1
            bar.update(len(prepared[0]))
    nbytes = tmp.stat().st_size
    stats = {"shard": out_path.name, "source": url, "samples": written, "bytes": nbytes,
             "skipped": skips.samples, "unreadable": skips.shards}
    write_json_atomic(out_path.with_suffix(".stats.json"), stats)
    os.replace(tmp, out_path)  # the tar appears last: a listed tar is always complete
    return stats


def _prepared_batches(url: str, writer: _ShardWriter, samples_per_batch: int, skips: SkipLog) -> Iterator:
    batch: list[ImageTextSample] = []
    for sample in iter_image_text([url], skips):
        batch.append(sample)
        if len(batch) == samples_per_batch:
            yield writer.prepare(batch)
            batch = []
    if batch:
        yield writer.prepare(batch)


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run `items` in a background thread, `depth` ahead: decoding and augmenting the next batch overlaps the
    teachers' forward pass on this one (PIL and torch both release the GIL in their kernels)."""
    queue: Queue = Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in items:
                queue.put(item)
            queue.put(done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            queue.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    while (item := queue.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


def _run_signature(data: str, urls: list[str], teachers: Sequence[str], captioners: Sequence[str],
                   config: ReinforceConfig) -> dict[str, Any]:
    cfg = asdict(config)
    cfg.pop("batch_size")  # results do not depend on it
    signature = {"data": data, "shards": urls, "teachers": list(teachers), "captioners": list(captioners),
                 "config": cfg}
    return json.loads(json.dumps(signature))  # as it reads back from disk (tuples become lists)


def reinforce(data: str, teachers: Sequence[str], out_dir: str | Path, config: ReinforceConfig,
              captioners: Sequence[str] = (), split: str = "train", progress: bool = True) -> dict[str, Any]:
    """Write a reinforced dataset of `data` to `out_dir` (resuming an unfinished run); returns its config.json."""
    from accelerate import PartialState

    from teachers import load_captioner, load_ensemble

    if not teachers:
        raise UserInputError("give at least one --teacher")
    config.__post_init__()  # fields may have been changed since construction
    if config.num_captions > 0 and not captioners:
        raise UserInputError("--num-captions needs a --captioner (or pass --num-captions 0)")
    out_dir = Path(out_dir)
    if (out_dir / CONFIG_NAME).is_file():
        raise UserInputError(f"{out_dir} is already a finished reinforced dataset (delete it to redo)")
    urls = resolve_shards(data, split)
    state = PartialState()
    # One run at a time on out_dir: a second is refused at once, and temporaries are only ever removed by the
    # run that owns the directory (those of a killed run, by the next one).
    with hold_directory(out_dir, enabled=state.is_main_process):
        if (out_dir / CONFIG_NAME).is_file():  # finished while this run waited to start
            raise UserInputError(f"{out_dir} is already a finished reinforced dataset (delete it to redo)")
        ensemble = load_ensemble(teachers, device=state.device)  # a bad spec fails before anything is written
        caps = [load_captioner(c, device=state.device) for c in captioners]
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

        writer = _ShardWriter(ensemble, caps, config)
        mine = [(n, url) for n, url in enumerate(urls) if n % state.num_processes == state.process_index]
        todo = [(n, url) for n, url in mine if not (out_dir / _shard_name(n)).is_file()]
        start = time.time()
        with tqdm(desc=f"reinforce [{state.process_index}]", unit="sample", disable=not progress, dynamic_ncols=True,
                  position=state.process_index) as bar:
            for n, url in todo:
                _process_shard(url, out_dir / _shard_name(n), writer, bar)
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
            "num_augs": config.num_augs,
            "num_captions": config.num_captions,
            "caption_sampling": {"top_p": config.top_p, "max_len": config.caption_max_len},
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

