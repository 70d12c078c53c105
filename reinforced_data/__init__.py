"""Data: the embedded OpenMoji set, reading user webdataset shards, writing and reading reinforced datasets.

The reinforced-dataset names (`open_reinforced`, `reinforce`, ...) load on first use, which keeps this package
free of import cycles with `teachers` and `distill`.
"""

import importlib

from reinforced_data.shards import (
    IMAGE_EXTENSIONS,
    ImageTextSample,
    SkipLog,
    decode_sample,
    iter_image_text,
    iter_raw_samples,
    read_lines,
    resolve_shards,
)

_LAZY = {
    "AugmentationConfig": "reinforced_data.augment",
    "replay_augmentation": "reinforced_data.augment",
    "ReinforcedInfo": "reinforced_data.reader",
    "pair_image_shards": "reinforced_data.reader",
    "open_reinforced": "reinforced_data.reader",
    "read_info": "reinforced_data.reader",
    "ReinforceConfig": "reinforced_data.writer",
    "reinforce": "reinforced_data.writer",
}

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageTextSample",
    "SkipLog",
    "decode_sample",
    "iter_image_text",
    "iter_raw_samples",
    "read_lines",
    "resolve_shards",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reinforced_data' has no attribute {name!r}")
