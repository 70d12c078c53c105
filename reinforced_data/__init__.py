"""Data: the embedded OpenMoji set, reading user webdataset shards, and (later) reinforced datasets."""

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

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageTextSample",
    "SkipLog",
    "decode_sample",
    "iter_image_text",
    "iter_raw_samples",
    "read_lines",
    "resolve_shards",
]
