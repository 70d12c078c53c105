"""The input pipeline: each process and worker reads its own shards, streams are reproducible, a resumed stream
continues with the very batches an uninterrupted one gives, and uneven shards never stall a reader."""

import itertools

import pytest
import torch

from reinforced_data.augment import AugmentationConfig
from reinforced_data.examples import DistillExamples, ImageTextSource, ReinforcedSource
from reinforced_data.pipeline import Batch, Example, ExampleStream, StreamTracker, assign_shards, make_loader
from reinforced_data.reader import read_info
from tests.conftest import write_shapes_root


def test_shards_are_dealt_to_processes_then_workers_and_reshuffled_each_epoch():
    urls = [f"{i}.tar" for i in range(10)]
    for epoch in (0, 1):
        parts = {(r, w): assign_shards(urls, 3, epoch, r, 2, w, 2) for r in range(2) for w in range(2)}
        dealt = [u for part in parts.values() for u in part.urls]
        assert sorted(dealt) == sorted(urls) and all(p.modulus == 1 for p in parts.values())  # each shard once
        assert {len(parts[0, 0].urls) + len(parts[0, 1].urls), len(parts[1, 0].urls) + len(parts[1, 1].urls)} == {5}
    assert assign_shards(urls, 3, 0, 0, 2, 0, 2).urls != assign_shards(urls, 3, 1, 0, 2, 0, 2).urls
    few = [assign_shards(["a", "b", "c"], 0, 0, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert [len(p.urls) for p in few] == [2, 2, 1, 1] and {(p.modulus, p.offset) for p in few[:2]} == {(2, 0), (2, 1)}
    one = [assign_shards(["a"], 0, 0, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(p.offset for p in one) == [0, 1, 2, 3] and all(p.modulus == 4 for p in one)


def _stream(dataset, workers: int, start=None, batch_size: int = 4, rank: int = 0, world: int = 1):
    info = read_info(dataset)
    source = ReinforcedSource(info, None, seed=1, aug_sampling="random")
    examples = DistillExamples(info.augmentation, 32, (0.5,) * 3, (0.5,) * 3, seed=1, teacher_views=False)
    return ExampleStream(info.shards, source, examples, batch_size, 1, 16, rank, world, workers, start)


def _take(stream, workers: int, n: int, tracker: StreamTracker | None = None) -> list:
    batches = []
    for batch in itertools.islice(make_loader(stream, workers, seed=1), n):
        if tracker is not None:
            tracker.update(batch)
        batches.append(batch)
    return batches


def _same(a, b) -> bool:
    return a.captions == b.captions and torch.equal(a.images, b.images) and torch.equal(a.image_emb, b.image_emb)


@pytest.fixture(scope="module")
def three_shard_dataset(tmp_path_factory, tiny_model_dirs):
    from teachers.reinforce import ReinforceConfig, reinforce

    root = write_shapes_root(tmp_path_factory.mktemp("data") / "shapes", per_pair=3, size=32, train_shards=3)
    out = tmp_path_factory.mktemp("dr") / "dr"
    reinforce(str(root), [str(tiny_model_dirs["teacher_a"])], out,
              ReinforceConfig(num_augs=2, num_captions=0, augmentation=AugmentationConfig(size=32), num_workers=0),
              progress=False)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_is_reproducible_and_resumes_with_the_batches_it_would_have_given(three_shard_dataset, workers):
    reference = _take(_stream(three_shard_dataset, workers), workers, 14)  # 36 samples of 4: past an epoch
    again = _take(_stream(three_shard_dataset, workers), workers, 14)
    assert all(_same(a, b) for a, b in zip(reference, again, strict=True))
    tracker = StreamTracker(workers)
    _take(_stream(three_shard_dataset, workers), workers, 5, tracker)
    resumed = _take(_stream(three_shard_dataset, workers, start=tracker.state()), workers, 9)
    assert all(_same(a, b) for a, b in zip(reference[5:], resumed, strict=True))


def test_a_resumed_worker_skips_to_its_place_without_decoding(three_shard_dataset):
    tracker = StreamTracker(0)
    _take(_stream(three_shard_dataset, 0), 0, 6, tracker)
    stream = _stream(three_shard_dataset, 0, start=tracker.state())
    decoded = []
    inner = stream.make_example
    stream.make_example = lambda record, epoch, skips: decoded.append(record["key"]) or inner(record, epoch, skips)
    _take(stream, 0, 1)
    assert len(decoded) == 4  # one batch decoded, none of the 24 samples before it


class _CollatedHere(torch.utils.data.IterableDataset):
    """Yields where the tensors of a batch collated in this process live."""

    def __iter__(self):
        batch = Batch.collate([Example(torch.rand(3, 8, 8), "a", image_emb=torch.rand(4)) for _ in range(2)])
        yield {"images": batch.images.is_shared(), "image_emb": batch.image_emb.is_shared()}


def test_a_worker_collates_its_batch_straight_into_shared_memory():
    """Sending a batch to the training process copies every tensor not yet in shared memory: a worker stacks the
    images (the largest part) and the embeddings there at once, as torch's default collate does."""
    assert next(iter(make_loader(_CollatedHere(), 1, seed=0))) == {"images": True, "image_emb": True}
    assert next(iter(_CollatedHere())) == {"images": False, "image_emb": False}  # in process: ordinary memory


def test_uneven_shards_keep_every_process_fed(tmp_path):
    root = write_shapes_root(tmp_path / "shapes", per_pair=1, size=16, train_shards=1)
    write_shapes_root(tmp_path / "more", per_pair=5, size=16, train_shards=2)  # 2 shards of 30 samples
    urls = [str(root / "train" / "0.tar"), str(tmp_path / "more" / "train" / "0.tar"),
            str(tmp_path / "more" / "train" / "1.tar")]  # 12, 30 and 30 samples

    class Raw:
        def __call__(self, record, epoch, skips):
            from reinforced_data.pipeline import Example

            return Example(torch.zeros(1), record["key"])

    for rank in range(2):
        stream = ExampleStream(urls, ImageTextSource(), Raw(), 8, 0, 8, rank, 2, 2)
        batches = _take(stream, 2, 40)  # several epochs of either process's share, uneven as they are
        assert len(batches) == 40 and all(len(b) == 8 for b in batches)


def test_embeddings_only_shards_join_their_image_shards_in_order_with_missing_images_counted(tmp_path,
                                                                                           tiny_model_dirs):
    import webdataset as wds

    from reinforced_data.reader import open_reinforced
    from reinforced_data.shards import SkipLog, iter_raw_samples
    from teachers.reinforce import ReinforceConfig, reinforce

    root = write_shapes_root(tmp_path / "shapes", per_pair=2, size=32, train_shards=2)
    full, bare = tmp_path / "full", tmp_path / "bare"
    for out, store in ((full, True), (bare, False)):
        reinforce(str(root), [str(tiny_model_dirs["teacher_a"])], out,
                  ReinforceConfig(num_augs=2, num_captions=0, augmentation=AugmentationConfig(size=32),
                                  store_images=store, num_workers=0), progress=False)
    joined = list(open_reinforced(bare, images=root))  # output shard n pairs with input shard n by position
    assert [(s["key"], s["caption"], s["image_bytes"]) for s in joined] == [
        (s["key"], s["caption"], s["image_bytes"]) for s in open_reinforced(full)]
    # an image shard that lacks one image and holds two others out of order
    images = tmp_path / "images"
    images.mkdir()
    for n in range(2):
        raws = list(iter_raw_samples([str(root / "train" / f"{n}.tar")]))
        if n == 0:
            raws = [raws[1], raws[0]] + raws[3:]  # the first two swapped, the fourth gone
        with wds.TarWriter(str(images / f"{n}.tar")) as sink:
            for raw in raws:
                sink.write({k: v for k, v in raw.items() if k != "__url__"})
    skips = SkipLog()
    keys = [s["key"] for s in open_reinforced(bare, images=images, skips=skips)]
    assert len(keys) == len(joined) - 1 and skips.sample_count == 1
    assert skips.samples[0]["reason"].startswith("no image: its key is not in 0.tar")
