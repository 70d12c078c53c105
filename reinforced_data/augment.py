"""Replayable image augmentations in Apple's DataCompDR layout.

One stored augmentation is `[[i, j, h, w], [[op_index, magnitude], ...]]`: the RandomResizedCrop box in source-image
pixels (top, left, height, width), then the RandAugment ops applied to the crop, each as its index in
`RAND_AUGMENT_OPS` (torchvision's order) and its signed magnitude as a float (the value itself, not a bin).
Replay order: crop and resize to the reference size -> RandAugment -> to tensor. Normalization is left to each
consumer (every teacher, later the student), which first resizes the view to its own input size, so a stored view
means the same picture to every model whatever its resolution.

Sampling mirrors torchvision's `RandomResizedCrop.get_params` and `RandAugment.forward` draw for draw, but from an
explicit `torch.Generator`, so an augmentation depends only on (seed, sample key, index), never on batch order.
Replay calls torchvision's own functional ops, as Apple's training code does.
"""

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import PIL.Image
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode, RandAugment
from torchvision.transforms.autoaugment import _apply_op

__all__ = [
    "RAND_AUGMENT_OPS",
    "AugmentationConfig",
    "augmentation_generator",
    "sample_augmentation",
    "replay_augmentation",
]

RAND_AUGMENT_OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
    "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)


@dataclass(frozen=True)
class AugmentationConfig:
    """`reinforce.image_augmentation` of a reinforced dataset's config.json (DataCompDR's keys and defaults)."""

    size: int = 224  # the reference size views are cropped to
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    rand_augment: bool = True
    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31
    rand_augment_interpolation: str = "nearest"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_config(self) -> dict[str, Any]:
        """The `reinforce.image_augmentation` dict (DataCompDR's layout, with the defaults written out)."""
        return {
            "random_resized_crop": {"size": self.size, "scale": list(self.scale), "ratio": list(self.ratio),
                                    "interpolation": self.interpolation},
            "rand_augment": {"enable": self.rand_augment, "p": 1.0, "num_ops": self.num_ops,
                             "magnitude": self.magnitude, "num_magnitude_bins": self.num_magnitude_bins,
                             "interpolation": self.rand_augment_interpolation},
            "to_rgb": {"enable": True},
            "to_tensor": {"enable": True},
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AugmentationConfig":
        """Read `reinforce.image_augmentation`; missing keys take torchvision's defaults, as Apple's code does."""
        crop = config.get("random_resized_crop", {})
        ra = config.get("rand_augment", {})
        size = crop.get("size", 224)
        return cls(
            size=int(size[0] if isinstance(size, (list, tuple)) else size),
            scale=tuple(crop.get("scale", (0.08, 1.0))),
            ratio=tuple(crop.get("ratio", (3 / 4, 4 / 3))),
            interpolation=crop.get("interpolation", "bilinear"),
            rand_augment=bool(ra.get("enable", bool(ra))),
            num_ops=int(ra.get("num_ops", 2)),
            magnitude=int(ra.get("magnitude", 9)),
            num_magnitude_bins=int(ra.get("num_magnitude_bins", 31)),
            rand_augment_interpolation=ra.get("interpolation", "nearest"),
            extra={k: v for k, v in config.items() if k not in ("random_resized_crop", "rand_augment")},
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def augmentation_generator(seed: int, key: str) -> torch.Generator:
    """The generator of one sample's augmentations: a function of (seed, key) alone."""
    digest = hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))
    return generator


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator).item())


def _randint(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(0, high, (1,), generator=generator).item())


def _sample_crop(width: int, height: int, config: AugmentationConfig, g: torch.Generator) -> list[int]:
    """torchvision's RandomResizedCrop.get_params with an explicit generator: [i, j, h, w]."""
    area = height * width
    log_ratio = (math.log(config.ratio[0]), math.log(config.ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(g, config.scale[0], config.scale[1])
        aspect_ratio = math.exp(_uniform(g, log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return [_randint(g, height - h + 1), _randint(g, width - w + 1), h, w]
    in_ratio = width / height  # fallback: the central crop
    if in_ratio < min(config.ratio):
        w, h = width, int(round(width / min(config.ratio)))
    elif in_ratio > max(config.ratio):
        h, w = height, int(round(height * max(config.ratio)))
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


def _sample_rand_augment(config: AugmentationConfig, g: torch.Generator) -> list[list[float]]:
    """torchvision's RandAugment draws with an explicit generator: [[op_index, signed magnitude], ...]."""
    space = RandAugment()._augmentation_space(config.num_magnitude_bins, (config.size, config.size))
    ops = []
    for _ in range(config.num_ops):
        index = _randint(g, len(RAND_AUGMENT_OPS))
        magnitudes, signed = space[RAND_AUGMENT_OPS[index]]
        magnitude = float(magnitudes[config.magnitude].item()) if magnitudes.ndim > 0 else 0.0
        if signed and _randint(g, 2):
            magnitude = -magnitude
        ops.append([index, magnitude])
    return ops


def sample_augmentation(width: int, height: int, config: AugmentationConfig, generator: torch.Generator) -> list:
    """One augmentation of a `width` x `height` source image, in DataCompDR's layout."""
    crop = _sample_crop(width, height, config, generator)
    ops = _sample_rand_augment(config, generator) if config.rand_augment else []
    return [crop, ops]


def replay_augmentation(image: PIL.Image.Image, params: list, config: AugmentationConfig,
                        size: int | None = None) -> torch.Tensor:
    """The augmented view as a float tensor (3, size, size) in [0, 1] (crop -> RandAugment -> to tensor).

    The crop is resized to the reference size `config.size` before RandAugment (whose translate magnitudes are in
    reference-size pixels); a `size` other than the reference resizes the finished view, as a consumer with another
    input resolution does.
    """
    (i, j, h, w), ops = params[0], params[1]
    view = TF.resized_crop(image.convert("RGB"), int(i), int(j), int(h), int(w), [config.size, config.size],
                           interpolation=InterpolationMode(config.interpolation), antialias=True)
    ra_interpolation = InterpolationMode(config.rand_augment_interpolation)
    for op_index, magnitude in ops:
        view = _apply_op(view, RAND_AUGMENT_OPS[int(op_index)], float(magnitude), interpolation=ra_interpolation,
                         fill=None)
    tensor = TF.to_tensor(view)  # (3, S, S) in [0, 1]
    if size is not None and size != config.size:
        tensor = TF.resize(tensor, [size, size], interpolation=InterpolationMode(config.interpolation),
                           antialias=True).clamp_(0, 1)
    return tensor
