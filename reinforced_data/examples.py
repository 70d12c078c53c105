"""What the input pipeline (`reinforced_data.pipeline`) reads and makes: the sources that turn shards into checked,
undecoded records, and the example makers that turn a record into a training `Example` in a worker.

Per-sample choices come from (seed, epoch, sample key) alone, never from the order samples arrive in: which stored
augmentation a view replays (random, or epoch % K), which synthetic caption comes with it, which of a sample's
captions teacher training takes. A record keeps only the embedding rows its epoch chose, so the shuffle buffer
holds a few rows a sample rather than all K + 1 + C.
"""

import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mdcore.configs import check_choice, check_range
from mdcore.errors import UserInputError
from reinforced_data.augment import (
    AugmentationConfig,
    augmentation_generator,
    replay_augmentation,
    sample_augmentation,
)
from reinforced_data.pipeline import Example
from reinforced_data.reader import ReinforcedInfo, reinforced_records
from reinforced_data.shards import IMAGE_EXTENSIONS, decode_sample, iter_raw_samples

__all__ = ["ImageTextSource", "ReinforcedSource", "CaptionChoice", "DistillExamples", "TransformExamples"]

NO_IMAGE = "no image (an embeddings-only dataset needs its image shards: --images)"


class ImageTextSource:
    """Plain image-text shards: records are the raw samples that hold an image."""

    def __call__(self, urls: list[str], epoch: int, skips) -> Any:
        for raw in iter_raw_samples(urls, skips):
            if any(ext in raw for ext in IMAGE_EXTENSIONS):
                yield {"key": raw["__key__"], "url": raw["__url__"], "source": raw, "params": None,
                       "syn_caption": "", "rows": None}
            else:
                skips.skip_sample(raw["__key__"], "no image", raw["__url__"])


@dataclass
class CaptionChoice:
    """Which synthetic caption a sample brings each epoch (MobileCLIP2's training options). The defaults give every
    sample one synthetic caption drawn at random from its caption sets, beside its real caption."""

    sets: str = r"^syn_text.*$"  # caption sets to draw from: a regular expression over their syn.json keys
    sampling: str = "random"  # "random", or "sequential": caption epoch % C of the drawn set
    mix_synthetic: bool = False  # one caption a sample: the real one, or with probability mix_ratio a synthetic one
    mix_ratio: float = 0.5

    def validate(self) -> None:
        try:
            re.compile(self.sets)
        except re.error as e:
            raise UserInputError(f"captions.sets is not a regular expression: {e}") from e
        check_choice("captions.sampling", self.sampling, ("random", "sequential"))
        check_range("captions.mix_ratio", self.mix_ratio, 0, 1)


class ReinforcedSource:
    """A reinforced dataset's shards (joined with `image_shards` when given): each record carries its sample's raw
    image, the augmentation its epoch replays, a synthetic caption (`CaptionChoice`), and those choices' embedding
    rows."""

    def __init__(self, info: ReinforcedInfo, image_shards: dict[str, str] | None, seed: int, aug_sampling: str,
                 embeddings: bool = True, captions: CaptionChoice | None = None):
        self.info, self.image_shards, self.seed, self.aug_sampling = info, image_shards, seed, aug_sampling
        self.embeddings = embeddings  # False: teachers in the loop, the stored rows are not needed
        self.captions = captions or CaptionChoice()
        self.pattern = re.compile(self.captions.sets)

    def __call__(self, urls: list[str], epoch: int, skips) -> Any:
        captions = self.captions
        for record in reinforced_records(self.info, urls, skips, self.image_shards):
            if record["source"] is None:
                skips.skip_sample(record["key"], NO_IMAGE, record["url"])
                continue
            choice = random.Random(f"{self.seed}/{epoch}/{record['key']}")
            stored = record["param_aug"]
            k = (choice.randrange(len(stored)) if self.aug_sampling == "random" else epoch % len(stored)) \
                if stored else 0
            sets = [s for key, s in record["caption_sets"].items() if self.pattern.match(key) and s[0]]
            syn, syn_emb = sets[0] if len(sets) == 1 else sets[choice.randrange(len(sets))] if sets else ([], None)
            j = (choice.randrange(len(syn)) if captions.sampling == "random" else epoch % len(syn)) if syn else -1
            image_emb, text_emb = record["image_emb"], record["text_emb"]
            width = text_emb.shape[1]
            real_row, syn_row = text_emb[0], syn_emb[j] if syn else np.zeros(width, np.float32)
            caption, syn_caption = None, syn[j] if syn else ""
            if captions.mix_synthetic:  # one caption: the real one, or a synthetic one in its place
                if syn and choice.random() < captions.mix_ratio:
                    caption, real_row = syn_caption, syn_row
                syn_caption, syn_row = "", np.zeros(width, np.float32)
            rows = (torch.from_numpy(image_emb[k].copy()), torch.from_numpy(real_row.copy()),
                    torch.from_numpy(syn_row.copy())) if self.embeddings else None
            yield {"key": record["key"], "url": record["url"], "source": record["source"],
                   "params": stored[k] if stored else None, "caption": caption, "syn_caption": syn_caption,
                   "rows": rows}


class DistillExamples:
    """A record -> the student's normalized view (and the teachers' view at the reference size, for teachers in
    the loop), its caption and synthetic caption, and their stored embedding rows. Plain image-text samples get a
    fresh augmentation per epoch, drawn from (seed, epoch, key)."""

    def __init__(self, augmentation: AugmentationConfig, size: int, mean, std, seed: int, teacher_views: bool):
        self.augmentation, self.size, self.seed, self.teacher_views = augmentation, size, seed, teacher_views
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, record: dict[str, Any], epoch: int, skips) -> Example | None:
        try:
            decoded = decode_sample(record["source"])
            params = record["params"]
            if params is None:
                generator = augmentation_generator(self.seed * 1_000_003 + epoch, record["key"])
                params = sample_augmentation(*decoded.image.size, self.augmentation, generator)
            view = replay_augmentation(decoded.image, params, self.augmentation, size=self.size)
            teacher_view = replay_augmentation(decoded.image, params, self.augmentation) if self.teacher_views \
                else None
        except ValueError as e:  # an undecodable image, a stored crop outside it, ...
            skips.skip_sample(record["key"], str(e), record["url"])
            return None
        image_emb, text_emb, syn_emb = record["rows"] or (None, None, None)
        return Example((view - self.mean) / self.std, record.get("caption") or decoded.caption,
                       record["syn_caption"], teacher_view, image_emb, text_emb, syn_emb)


class TransformExamples:
    """A raw image-text record -> (the model's own training transform of the image, a caption). A sample whose
    `json` lists `captions` (the emoji set's) gets one of them, drawn from (seed, epoch, key): a text augmentation."""

    def __init__(self, transform, seed: int):
        self.transform, self.seed = transform, seed

    def __call__(self, record: dict[str, Any], epoch: int, skips) -> Example | None:
        try:
            sample = decode_sample(record["source"])
        except ValueError as e:
            skips.skip_sample(record["key"], str(e), record["url"])
            return None
        captions = sample.meta.get("captions")
        caption = random.Random(f"{self.seed}/{epoch}/{sample.key}").choice(captions) if captions else sample.caption
        return Example(self.transform(sample.image), caption)
