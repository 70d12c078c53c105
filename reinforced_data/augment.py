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

from mdcore.errors import UserInputError

__all__ = [
    "RAND_AUGMENT_OPS",
    "AugmentationConfig",
    "augmentation_generator",
    "sample_augmentation",
    "replay_augmentation",
    "check_augmentation",
]

MAX_OPS = 16  # RandAugment applies 2 by default; more is a corrupt or hostile record
MAX_VIEW_SIZE = 4096  # the reference size views are stored at (a 20000-px view ran out of memory)

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

    def __post_init__(self):
        """Refuse settings that cannot be replayed or that would allocate without bound (views are size^2)."""
        def number(value, low, high, integer=False):
            kind = (int,) if integer else (int, float)
            return isinstance(value, kind) and not isinstance(value, bool) and low <= value <= high

        if not number(self.size, 8, MAX_VIEW_SIZE, integer=True):
            raise UserInputError(f"augmentation size must be an integer in [8, {MAX_VIEW_SIZE}], got {self.size!r}")
        pair = isinstance(self.scale, (tuple, list)) and len(self.scale) == 2
        if not pair or not all(number(v, 1e-6, 1.0) for v in self.scale) or self.scale[0] > self.scale[1]:
            raise UserInputError(f"crop scale must be 0 < min <= max <= 1, got {self.scale!r}")
        pair = isinstance(self.ratio, (tuple, list)) and len(self.ratio) == 2
        if not pair or not all(number(v, 1e-3, 1e3) for v in self.ratio) or self.ratio[0] > self.ratio[1]:
            raise UserInputError(f"crop aspect ratio must be 0 < min <= max, got {self.ratio!r}")
        modes = [m.value for m in InterpolationMode]
        for name in ("interpolation", "rand_augment_interpolation"):
            if getattr(self, name) not in modes:
                raise UserInputError(f"{name} must be one of {', '.join(modes)}, got {getattr(self, name)!r}")
        if not number(self.num_ops, 0, MAX_OPS, integer=True) or not number(self.num_magnitude_bins, 2, 1024, True) \
                or not number(self.magnitude, 0, self.num_magnitude_bins - 1, integer=True):
            raise UserInputError(f"RandAugment needs num_ops in [0, {MAX_OPS}] and 0 <= magnitude < "
                                 f"num_magnitude_bins, got {self.num_ops!r}, {self.magnitude!r}, "
                                 f"{self.num_magnitude_bins!r}")

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
        if not isinstance(crop, dict) or not isinstance(ra, dict):
            raise UserInputError("image_augmentation's random_resized_crop and rand_augment must be objects")
        size = crop.get("size", 224)
        return cls(
            size=size[0] if isinstance(size, (list, tuple)) and size else size,
            scale=_pair(crop.get("scale", (0.08, 1.0))),
            ratio=_pair(crop.get("ratio", (3 / 4, 4 / 3))),
            interpolation=crop.get("interpolation", "bilinear"),
            rand_augment=bool(ra.get("enable", bool(ra))),
            num_ops=ra.get("num_ops", 2),
            magnitude=ra.get("magnitude", 9),
            num_magnitude_bins=ra.get("num_magnitude_bins", 31),
            rand_augment_interpolation=ra.get("interpolation", "nearest"),
            extra={k: v for k, v in config.items() if k not in ("random_resized_crop", "rand_augment")},
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pair(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


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


_MAX_MAGNITUDE = 1e4  # rotations in degrees, shears, translations in pixels, brightness factors: all far below


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_augmentation(params: Any, width: int | None = None, height: int | None = None) -> None:
    """Raise ValueError when a stored augmentation is not one this module can replay: `[[i, j, h, w],
    [[op_index, magnitude], ...]]` with a non-empty crop box (inside a `width` x `height` image when given), op
    indices into `RAND_AUGMENT_OPS`, finite magnitudes (Posterize's a bit count in [0, 8])."""
    if not isinstance(params, list) or len(params) != 2 or not isinstance(params[0], list) or not isinstance(
            params[1], list):
        raise ValueError("stored augmentation is not [[i, j, h, w], [ops]]")
    box, ops = params
    if len(box) != 4 or not all(_is_number(v) and float(v).is_integer() for v in box):
        raise ValueError("stored crop box is not four integers")
    i, j, h, w = (int(v) for v in box)
    if i < 0 or j < 0 or h <= 0 or w <= 0:
        raise ValueError(f"stored crop box {[i, j, h, w]} is empty or negative")
    if height is not None and width is not None and (i + h > height or j + w > width):
        raise ValueError(f"stored crop box {[i, j, h, w]} lies outside the {width} x {height} image")
    if len(ops) > MAX_OPS:
        raise ValueError(f"stored augmentation has {len(ops)} ops (at most {MAX_OPS})")
    for op in ops:
        if not isinstance(op, list) or len(op) != 2 or not _is_number(op[0]) or not _is_number(op[1]):
            raise ValueError("stored augmentation op is not [op_index, magnitude]")
        index, magnitude = op
        if not float(index).is_integer() or not 0 <= index < len(RAND_AUGMENT_OPS):
            raise ValueError(f"stored augmentation op index {index} is not one of the {len(RAND_AUGMENT_OPS)} ops")
        if abs(magnitude) > _MAX_MAGNITUDE or RAND_AUGMENT_OPS[int(index)] == "Posterize" and not (
                float(magnitude).is_integer() and 0 <= magnitude <= 8):
            raise ValueError(f"stored magnitude {magnitude} is out of range for {RAND_AUGMENT_OPS[int(index)]}")


def replay_augmentation(image: PIL.Image.Image, params: list, config: AugmentationConfig,
                        size: int | None = None) -> torch.Tensor:
    """The augmented view as a float tensor (3, size, size) in [0, 1] (crop -> RandAugment -> to tensor).

    The crop is resized to the reference size `config.size` before RandAugment (whose translate magnitudes are in
    reference-size pixels); a `size` other than the reference resizes the finished view, as a consumer with another
    input resolution does. Stored parameters are checked first (`check_augmentation`): ValueError when they cannot
    be replayed on this image.
    """
    check_augmentation(params, *image.size)
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
