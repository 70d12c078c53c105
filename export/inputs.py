"""Real inputs for parity checks and int8 calibration: dataset images and captions when a dataset is given,
otherwise generated pictures (shapes, gradients, noise) and everyday captions of several lengths."""

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mdcore.errors import UserInputError
from reinforced_data.shards import SkipLog, iter_image_text, resolve_shards

__all__ = ["InputSet", "load_inputs", "generated_images", "DEFAULT_TEXTS"]

DEFAULT_TEXTS = (
    "a photo of a dog.",
    "an emoji of a smiling face with heart-eyes.",
    "a red bicycle leaning against a brick wall on a rainy afternoon in the old town.",
    "cat",
    "two people hiking up a snowy mountain trail at sunrise, carrying bright orange backpacks.",
    "a diagram of the water cycle.",
    "a bowl of ramen with an egg, green onions and slices of pork, seen from above on a wooden table, "
    "next to chopsticks, a glass of water and a small dish of chili oil; a long caption that the tokenizer "
    "truncates at the model's context length.",
    "A Yellow Taxi!",
)


@dataclass
class InputSet:
    images: list  # PIL images
    texts: list[str]
    source: str  # where they came from, for the report


def generated_images(count: int, size: int = 224, seed: int = 0) -> list:
    """Pictures with the structure real photos have (flat regions, edges, gradients, texture), not white noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([a * x + b * y + c for a, b, c in rng.uniform(-0.5, 0.5, (3, 3))], axis=-1) + 0.5
        noise = rng.normal(0, 0.05, (size, size, 3))
        image = Image.fromarray((np.clip(base + noise, 0, 1) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 5))):
            box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
            xy = [box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1]
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(xy, fill=color)
        images.append(image)
    return images


def load_inputs(data: str | Path | None, split: str, count: int, image_size: int = 224, seed: int = 0,
                text_count: int | None = None) -> InputSet:
    """The first `count` usable samples of a dataset split (a dataset root, a shard directory or a pattern), or
    generated ones when `data` is None."""
    if data is None:
        texts = list(itertools.islice(itertools.cycle(DEFAULT_TEXTS), text_count or len(DEFAULT_TEXTS)))
        return InputSet(generated_images(count, image_size, seed), texts, f"generated ({count} images)")

    root = Path(data)
    use_split = split if (root / split).is_dir() else None
    if root.is_dir() and use_split is None and (root / "train").is_dir():
        raise UserInputError(f"dataset root {root} has no split {split!r}")
    samples = list(itertools.islice(iter_image_text(resolve_shards(data, use_split), SkipLog()), count))
    if not samples:
        raise UserInputError(f"no usable samples in {data}" + (f" split {split}" if use_split else ""))
    where = f"{data}/{use_split}" if use_split else str(data)
    return InputSet([s.image.convert("RGB") for s in samples], [s.caption for s in samples],
                    f"dataset {where} ({len(samples)} samples)")
