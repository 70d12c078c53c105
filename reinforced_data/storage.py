"""How embeddings are stored in a reinforced sample: fp32 / fp16 npz (Apple's), bf16 pth.gz (Apple's), int8 npz (ours).

int8 keeps one symmetric scale per row and per teacher: each teacher's slice of a row is divided by its own
max-abs / 127 and rounded. Teachers' slices are L2-normalized separately, so one scale per slice keeps every
teacher's precision (a shared scale would let the teacher with the largest entries squeeze the others).
"""

import gzip
import io
import math
import pickle
import zipfile
import zlib
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["STORAGE_DTYPES", "MAX_EMBEDDING_BYTES", "encode_embeddings", "decode_embeddings", "stored_dtype",
           "quantize_int8", "dequantize_int8"]

STORAGE_DTYPES = ("fp32", "fp16", "bf16", "int8")


def quantize_int8(x: np.ndarray, dims: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """x (N, sum dims) float -> (int8 values (N, sum dims), float32 scales (N, len(dims)))."""
    values = np.empty(x.shape, dtype=np.int8)
    scales = np.empty((x.shape[0], len(dims)), dtype=np.float32)
    start = 0
    for t, dim in enumerate(dims):
        part = x[:, start:start + dim].astype(np.float32)  # (N, dim)
        scale = np.abs(part).max(axis=1) / 127.0  # (N,)
        scale[scale == 0] = 1.0
        values[:, start:start + dim] = np.clip(np.rint(part / scale[:, None]), -127, 127).astype(np.int8)
        scales[:, t] = scale
        start += dim
    return values, scales


def dequantize_int8(values: np.ndarray, scales: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """Inverse of `quantize_int8`: (N, sum dims) float32."""
    out = values.astype(np.float32)
    start = 0
    for t, dim in enumerate(dims):
        out[:, start:start + dim] *= scales[:, t:t + 1]
        start += dim
    return out


def encode_embeddings(image_emb: np.ndarray, text_emb: np.ndarray, dtype: str, dims: Sequence[int]
                      ) -> tuple[str, bytes]:
    """(member extension, bytes) of one sample's embeddings in the storage dtype."""
    if dtype == "bf16":
        buffer = io.BytesIO()
        torch.save({"image_emb": torch.from_numpy(image_emb).to(torch.bfloat16),
                    "text_emb": torch.from_numpy(text_emb).to(torch.bfloat16)}, buffer)
        return "pth.gz", gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0)
    arrays: dict[str, np.ndarray]
    if dtype == "int8":
        image_q, image_s = quantize_int8(image_emb, dims)
        text_q, text_s = quantize_int8(text_emb, dims)
        arrays = {"image_emb": image_q, "image_emb_scale": image_s, "text_emb": text_q, "text_emb_scale": text_s}
    elif dtype in ("fp32", "fp16"):
        np_dtype = np.float32 if dtype == "fp32" else np.float16
        arrays = {"image_emb": image_emb.astype(np_dtype), "text_emb": text_emb.astype(np_dtype)}
    else:
        raise ValueError(f"unknown storage dtype {dtype!r} (one of {', '.join(STORAGE_DTYPES)})")
    buffer = io.BytesIO()
    # int8 codes of normalized embeddings carry about 7 bits of entropy: deflate saves a tenth more, while float
    # arrays barely compress and are left stored (Apple's fp32 shards are plain npz).
    (np.savez_compressed if dtype == "int8" else np.savez)(buffer, **arrays)
    return "npz", buffer.getvalue()


MAX_EMBEDDING_BYTES = 64 * 1024 * 1024  # one sample's decoded embeddings (DataCompDR's: 30 x 1536 fp32, 184 KiB)


def _gunzip_bounded(data: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = inflater.decompress(data, limit)
    if inflater.unconsumed_tail:
        raise ValueError(f"embeddings larger than {limit} bytes once decompressed")
    return out


def _npz_headers(data: bytes, limit: int) -> dict[str, np.dtype]:
    """Each array's dtype, read from the headers alone; ValueError for an npz whose arrays would allocate more than
    `limit` bytes or more than they hold, checked before numpy allocates anything."""
    dtypes = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.file_size > limit:
                raise ValueError(f"embedding array {info.filename} larger than {limit} bytes")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"embedding array {info.filename} has npy format {version}")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(member)
                if dtype.hasobject:
                    raise ValueError(f"embedding array {info.filename} holds Python objects")
                if math.prod(shape) * dtype.itemsize > info.file_size:
                    raise ValueError(f"embedding array {info.filename} claims more data than it holds")
                dtypes[info.filename.removesuffix(".npy")] = dtype
    return dtypes


def stored_dtype(ext: str, data: bytes) -> str:
    """The storage dtype (`STORAGE_DTYPES`) of an embeddings member, from its headers alone."""
    if ext == "pth.gz":
        return "bf16"
    try:
        dtype = _npz_headers(data, MAX_EMBEDDING_BYTES).get("image_emb")
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"unreadable npz embeddings: {type(e).__name__}") from e
    names = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16", np.dtype(np.int8): "int8"}
    if dtype not in names:
        raise ValueError(f"image_emb of dtype {dtype} is not a storage dtype")
    return names[dtype]


def decode_embeddings(ext: str, data: bytes, dims: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image_emb, text_emb) as float32 from an `npz` or `pth.gz` member; int8 needs the teachers' `dims`.

    Both are untrusted input: what they may allocate is bounded (`MAX_EMBEDDING_BYTES`) before it is allocated,
    and anything malformed is a ValueError with the reason."""
    try:
        if ext == "pth.gz":
            tensors = torch.load(io.BytesIO(_gunzip_bounded(data, MAX_EMBEDDING_BYTES)), map_location="cpu",
                                 weights_only=True)
            if not isinstance(tensors, dict) or not all(isinstance(tensors.get(k), torch.Tensor)
                                                        for k in ("image_emb", "text_emb")):
                raise ValueError("pth.gz does not hold image_emb and text_emb tensors")
            return tensors["image_emb"].float().numpy(), tensors["text_emb"].float().numpy()
        _npz_headers(data, MAX_EMBEDDING_BYTES)
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            image, text = arrays["image_emb"], arrays["text_emb"]
            if image.dtype == np.int8:
                if dims is None:
                    raise ValueError("int8 embeddings need the teachers' dimensions to dequantize")
                image_scale, text_scale = arrays["image_emb_scale"], arrays["text_emb_scale"]
                for values, scale in ((image, image_scale), (text, text_scale)):
                    if values.ndim != 2 or values.shape[1] != sum(dims) or scale.shape != (len(values), len(dims)):
                        raise ValueError(f"int8 embeddings {values.shape} with scales {scale.shape} do not fit "
                                         f"the teachers' dimensions {list(dims)}")
                return dequantize_int8(image, image_scale, dims), dequantize_int8(text, text_scale, dims)
            return image.astype(np.float32), text.astype(np.float32)
    except (KeyError, OSError, EOFError, zlib.error, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError) as e:
        raise ValueError(f"unreadable {ext} embeddings: {type(e).__name__}") from e
