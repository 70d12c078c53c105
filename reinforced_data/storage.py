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

__all__ = ["STORAGE_DTYPES", "MAX_EMBEDDING_BYTES", "encode_embeddings", "decode_embeddings",
           "decode_embedding_arrays", "read_arrays", "write_arrays", "stored_dtype", "quantize_int8",
           "dequantize_int8"]

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


def encode_embeddings(image_emb: np.ndarray, text_emb: np.ndarray, dtype: str, dims: Sequence[int],
                      extra: dict[str, np.ndarray] | None = None) -> tuple[str, bytes]:
    """(member extension, bytes) of one sample's embeddings in the storage dtype: `image_emb`, `text_emb` and any
    `extra` arrays of the same width (a captioner's caption embeddings, `syn_text<suffix>_emb`)."""
    named = {"image_emb": image_emb, "text_emb": text_emb, **(extra or {})}
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r} (one of {', '.join(STORAGE_DTYPES)})")
    if dtype == "bf16":
        return "pth.gz", write_arrays("pth.gz", {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16)
                                                 for k, v in named.items()})
    arrays: dict[str, np.ndarray] = {}
    for name, value in named.items():
        if dtype == "int8":
            arrays[name], arrays[f"{name}_scale"] = quantize_int8(value, dims)
        else:
            arrays[name] = value.astype(np.float32 if dtype == "fp32" else np.float16)
    return "npz", write_arrays("npz", arrays)


def write_arrays(ext: str, arrays: dict) -> bytes:
    """An embeddings member holding `arrays` as they are (numpy arrays for npz, torch tensors for pth.gz)."""
    buffer = io.BytesIO()
    if ext == "pth.gz":
        torch.save(arrays, buffer)
        return gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0)
    # int8 codes of normalized embeddings carry about 7 bits of entropy: deflate saves a tenth more, while float
    # arrays barely compress and are left stored (Apple's fp32 shards are plain npz).
    compressed = any(v.dtype == np.int8 for v in arrays.values())
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


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


def read_arrays(ext: str, data: bytes) -> dict:
    """Every array of an `npz` or `pth.gz` embeddings member as stored (numpy arrays, or torch tensors for
    pth.gz), read within `MAX_EMBEDDING_BYTES`; ValueError with the reason when it is malformed."""
    try:
        if ext == "pth.gz":
            tensors = torch.load(io.BytesIO(_gunzip_bounded(data, MAX_EMBEDDING_BYTES)), map_location="cpu",
                                 weights_only=True)
            if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                        for k, v in tensors.items()):
                raise ValueError("pth.gz does not hold named tensors")
            return tensors
        _npz_headers(data, MAX_EMBEDDING_BYTES)
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    except (KeyError, OSError, EOFError, zlib.error, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError) as e:
        raise ValueError(f"unreadable {ext} embeddings: {type(e).__name__}") from e


def decode_embedding_arrays(ext: str, data: bytes, dims: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Every embedding array of a member (`image_emb`, `text_emb`, `*_emb`) as float32, int8 ones dequantized
    with their `*_scale` and the teachers' `dims`. Untrusted input: allocation is bounded before it happens, and
    anything malformed is a ValueError with the reason."""
    arrays = read_arrays(ext, data)
    if "image_emb" not in arrays or "text_emb" not in arrays:
        raise ValueError(f"{ext} does not hold image_emb and text_emb")
    out = {}
    for name, values in arrays.items():
        if not name.endswith("_emb"):
            continue
        if isinstance(values, torch.Tensor):
            out[name] = values.float().numpy()
        elif values.dtype == np.int8:
            scale = arrays.get(f"{name}_scale")
            if dims is None:
                raise ValueError("int8 embeddings need the teachers' dimensions to dequantize")
            if scale is None or values.ndim != 2 or values.shape[1] != sum(dims) or scale.shape != (
                    len(values), len(dims)):
                raise ValueError(f"int8 {name} {values.shape} with scales "
                                 f"{None if scale is None else scale.shape} does not fit the teachers' dimensions "
                                 f"{list(dims)}")
            out[name] = dequantize_int8(values, scale, dims)
        elif values.dtype.kind == "f":
            out[name] = values.astype(np.float32)
        else:
            raise ValueError(f"{name} has dtype {values.dtype}")
    return out


def decode_embeddings(ext: str, data: bytes, dims: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image_emb, text_emb) as float32 from an `npz` or `pth.gz` member (`decode_embedding_arrays`)."""
    arrays = decode_embedding_arrays(ext, data, dims)
    return arrays["image_emb"], arrays["text_emb"]
