"""The input pipeline of `teachers train`, `distill` and `reinforce`: shards to processes, then to DataLoader workers.

    shards --(epoch's shuffle, rank)--> a process --(worker)--> a DataLoader worker:
        read its shards (local files or URLs) -> parse and check each sample -> webdataset's shuffle buffer
        -> decode, replay the stored augmentation, normalize -> batches (pinned, prefetched)

Each process reads only its own shards, and each of its `num_workers` workers a part of those; decoding and
augmentation run in the workers (`num_workers=0` keeps them in the training process). When there are fewer shards
than readers, the readers of a shard split it sample by sample instead.

Epochs are endless per reader: a worker that finishes its part of epoch e goes on with its part of epoch e + 1, so
no process ever waits at an epoch end for another whose shards held more samples (webdataset's "resampled"
behaviour, with each shard still read once per epoch). What is guaranteed: for a given seed, process count and
worker count, the batches, and so the losses, are the same on every run, and a resumed run continues with exactly
the batches the uninterrupted run would have seen (each batch says where its worker stood, and a resumed worker
skips to there without decoding). Another process or worker count gives other (equally shuffled) batches.
"""

import hashlib
import itertools
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import webdataset as wds

from mdcore.threads import usable_cores
from reinforced_data.locations import bytes_read
from reinforced_data.shards import SkipLog

__all__ = ["stable_seed", "default_num_workers", "assign_shards", "Example", "Batch", "ExampleStream", "make_loader",
           "StreamTracker", "SkipRecord"]


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from `parts` that is the same in every process and on every run (unlike `hash` of a str)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def default_num_workers() -> int:
    """Workers per process: the cores this process may use, less one for the process itself (at most 8)."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, usable_cores() // max(1, local_processes) - 1))


@dataclass(frozen=True)
class Assignment:
    """The shards one reader reads in one epoch, and which of their samples it keeps (index % modulus == offset)."""

    urls: list[str]
    modulus: int = 1
    offset: int = 0


def assign_shards(urls: list[str], seed: int, epoch: int, rank: int, world: int, worker: int, workers: int,
                  shuffle: bool = True) -> Assignment:
    """Reader (rank, worker)'s part of epoch `epoch`: the epoch's shard order (shuffled from (seed, epoch), the same
    in every process) dealt to processes, then to their workers; split by samples where shards run out."""
    order = list(urls)
    if shuffle:
        random.Random(f"{seed}/shards/{epoch}").shuffle(order)
    if len(order) >= world * workers:
        return Assignment(order[rank::world][worker::workers])
    if len(order) >= world:
        return Assignment(order[rank::world], workers, worker)
    return Assignment(order, world * workers, rank * workers + worker)


@dataclass
class SkipRecord:
    """A skipped sample (`key` set) or an unreadable shard, as a worker reports it to its process."""

    reason: str
    shard: str | None = None
    key: str | None = None


@dataclass
class Example:
    """One training sample as a worker makes it: the student's view and what the losses compare it with."""

    image: torch.Tensor  # (3, S, S), normalized for the model being trained
    caption: str
    syn_caption: str = ""
    teacher_image: torch.Tensor | None = None  # (3, R, R) in [0, 1], for teachers in the loop
    image_emb: torch.Tensor | None = None  # (D,) stored teacher embeddings of this view
    text_emb: torch.Tensor | None = None  # (D,) of the real caption
    syn_emb: torch.Tensor | None = None  # (D,) of the synthetic caption


def _stack(values: list) -> torch.Tensor | None:
    """The tensors stacked; in a DataLoader worker straight into shared memory, as torch's default collate does,
    saving the copy that sending the batch to the training process would otherwise make."""
    if values[0] is None:
        return None
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(values)
    out = torch.empty((len(values), *values[0].shape), dtype=values[0].dtype).share_memory_()
    return torch.stack(values, out=out)


@dataclass
class Batch:
    """A batch of `Example`s, with where its worker stood after it (to resume) and what it skipped on the way."""

    images: torch.Tensor  # (B, 3, S, S)
    captions: list[str]
    syn_captions: list[str]
    teacher_images: torch.Tensor | None  # (B, 3, R, R)
    image_emb: torch.Tensor | None  # (B, D)
    text_emb: torch.Tensor | None  # (B, D)
    syn_emb: torch.Tensor | None  # (B, D)
    worker: int = 0  # the logical worker that made it
    epoch: int = 0  # that worker's epoch after this batch
    emitted: int = 0  # samples that worker's shuffle buffer had emitted in that epoch
    skips: list[SkipRecord] = field(default_factory=list)  # skipped since that worker's previous batch
    bytes_read: int = 0  # by that worker's stream so far

    @classmethod
    def collate(cls, examples: list[Example], **position: Any) -> "Batch":
        return cls(_stack([e.image for e in examples]), [e.caption for e in examples],
                   [e.syn_caption for e in examples], _stack([e.teacher_image for e in examples]),
                   _stack([e.image_emb for e in examples]), _stack([e.text_emb for e in examples]),
                   _stack([e.syn_emb for e in examples]), **position)

    @classmethod
    def collate_empty(cls, **position: Any) -> "Batch":
        """A batch of no samples: how a worker whose shards hold none reports what it skipped."""
        return cls(torch.zeros(0), [], [], None, None, None, None, **position)

    def __len__(self) -> int:
        return len(self.captions)

    def pin_memory(self) -> "Batch":
        """Page-locked copies of the tensors (the DataLoader calls this when pin_memory is on)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def to(self, device: torch.device) -> "Batch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                        for k, v in values.items()})


class _WorkerSkips:
    """A worker's skip log: what it records goes out with its next batch (`SkipLog` duck type)."""

    def __init__(self):
        self.pending: list[SkipRecord] = []

    def skip_sample(self, key: str, reason: str, shard: str | None = None) -> None:
        self.pending.append(SkipRecord(reason, shard, key))

    def skip_shard(self, url: str, reason: str) -> None:
        self.pending.append(SkipRecord(reason, url))

    def take(self) -> list[SkipRecord]:
        taken, self.pending = self.pending, []
        return taken


# (urls of one reader's epoch, epoch, skip log) -> records: parsed and checked, not yet decoded
Source = Callable[[list[str], int, Any], Iterator[Any]]
# (record, epoch, skip log) -> Example, or None when the record turns out unusable (recorded in the log)
MakeExample = Callable[[Any, int, Any], Example | None]


class ExampleStream(torch.utils.data.IterableDataset):
    """Endless batches of this process's share of the shards (see the module docstring), made in DataLoader
    workers or, with none, in the calling process.

    `start` resumes: {"workers": n, "consumed": batches already taken, "positions": {worker: [epoch, emitted]}}
    as `StreamTracker.state()` saved it. Batches come from the workers in turn, so after `consumed` batches the
    next comes from worker consumed % n: DataLoader slot s plays logical worker (s + consumed) % n.
    """

    def __init__(self, urls: list[str], source: Source, make_example: MakeExample, batch_size: int, seed: int,
                 shuffle_buffer: int, rank: int = 0, world: int = 1, num_workers: int = 0,
                 start: dict[str, Any] | None = None):
        super().__init__()
        self.urls, self.source, self.make_example = list(urls), source, make_example
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.workers = max(1, num_workers)
        self.buffer = max(1, shuffle_buffer // self.workers)  # shuffle_buffer samples per process, in all
        start = start if start and start.get("workers") == self.workers else None
        self.rotation = start["consumed"] % self.workers if start else 0
        self.positions = {int(w): tuple(p) for w, p in start["positions"].items()} if start else {}

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.workers
        first_epoch, skip = self.positions.get(worker, (0, 0))
        skips = _WorkerSkips()
        read_before = bytes_read()  # a forked worker starts with its parent's count
        examples: list[Example] = []
        for epoch in itertools.count(first_epoch):
            part = assign_shards(self.urls, self.seed, epoch, self.rank, self.world, worker, self.workers)
            if not part.urls:
                return
            if info is not None:  # a worker: transforms that draw from the global generator draw reproducibly
                torch.manual_seed(stable_seed(self.seed, "worker", self.rank, worker, epoch))
            records = self.source(part.urls, epoch, skips)
            if part.modulus > 1:
                records = (r for i, r in enumerate(records) if i % part.modulus == part.offset)
            rng = random.Random(f"{self.seed}/buffer/{epoch}/{self.rank}/{worker}")
            emitted = 0
            # webdataset's shuffle buffer, filled before its first pick
            for record in wds.shuffle(self.buffer, initial=self.buffer, rng=rng)(iter(records)):
                emitted += 1
                if emitted <= skip:  # resuming: taken before the interruption, never decoded again
                    continue
                example = self.make_example(record, epoch, skips)
                if example is None:
                    continue
                examples.append(example)
                if len(examples) == self.batch_size:
                    yield Batch.collate(examples, worker=worker, epoch=epoch, emitted=emitted, skips=skips.take(),
                                        bytes_read=bytes_read() - read_before)
                    examples = []
            if emitted == 0:  # nothing readable in this worker's shards: it stops (the others go on)
                if skips.pending:
                    yield Batch.collate_empty(worker=worker, epoch=epoch, skips=skips.take(),
                                              bytes_read=bytes_read() - read_before)
                return
            skip = 0


def make_loader(dataset: torch.utils.data.IterableDataset, num_workers: int, seed: int, pin_memory: bool = False,
                batch_size: int | None = None, collate_fn=None) -> torch.utils.data.DataLoader:
    """A DataLoader over an iterable dataset that makes its own batches (`batch_size=None`), with `num_workers`
    worker processes prefetching two batches each, pinned when the model trains on a GPU."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=collate_fn if collate_fn is not None else (lambda batch: batch),
        prefetch_factor=2 if num_workers else None,
        generator=torch.Generator().manual_seed(seed),  # never draws from the global random state
        multiprocessing_context="fork" if num_workers and "fork" in torch.multiprocessing.get_all_start_methods()
        else None)


class StreamTracker:
    """The training process's view of its stream: where each worker stands (saved in checkpoints), what the
    workers skipped (`skips`, a sample met again in a later epoch counted once), and how many bytes they read."""

    def __init__(self, workers: int, start: dict[str, Any] | None = None):
        self.workers = max(1, workers)
        same = bool(start) and start.get("workers") == self.workers
        self.consumed = start["consumed"] if same else 0
        self.positions: dict[int, list[int]] = {int(w): list(p) for w, p in start["positions"].items()} if same \
            else {}
        self.bytes: dict[int, int] = {}
        self.skips = SkipLog()
        self._seen: set[tuple] = set()

    def update(self, batch: Batch) -> None:
        if len(batch):  # an empty batch is a stopping worker's last report, not a step's data
            self.consumed += 1
            self.positions[batch.worker] = [batch.epoch, batch.emitted]
        self.bytes[batch.worker] = batch.bytes_read
        for record in batch.skips:
            identity = (record.key, record.shard, record.reason)
            if identity in self._seen:
                continue
            if len(self._seen) < 10 * SkipLog.MAX_ENTRIES:
                self._seen.add(identity)
            if record.key is None:
                self.skips.skip_shard(record.shard, record.reason)
            else:
                self.skips.skip_sample(record.key, record.reason, record.shard)

    def state(self) -> dict[str, Any]:
        return {"workers": self.workers, "consumed": self.consumed,
                "positions": {str(w): p for w, p in sorted(self.positions.items())}}

    @property
    def bytes_read(self) -> int:
        return sum(self.bytes.values())
