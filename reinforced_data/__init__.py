"""Data: the embedded OpenMoji set, user webdataset shards (local or in object storage), replayable augmentations,
the input pipeline, and the reinforced-dataset layout (storage, reader, inspection).

Above `mdmodels` and `mdcore`; the jobs that fill a reinforced dataset with teachers' embeddings live in `teachers`.
"""

import mdcore  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
from reinforced_data.augment import AugmentationConfig, replay_augmentation
from reinforced_data.reader import ReinforcedInfo, open_reinforced, pair_image_shards, read_info
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

__all__ = ["IMAGE_EXTENSIONS", "ImageTextSample", "SkipLog", "decode_sample", "iter_image_text", "iter_raw_samples",
           "read_lines", "resolve_shards", "AugmentationConfig", "replay_augmentation", "ReinforcedInfo",
           "open_reinforced", "pair_image_shards", "read_info"]
