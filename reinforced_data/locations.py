"""Where shards live: local paths, URLs of any filesystem fsspec knows (`https://`, `s3://`, `gs://`, ...), and
webdataset's `pipe:` commands.

Remote files are opened with fsspec as streams, so a tar shard is read once, front to back, as a local one is.
Credentials and endpoints come from each filesystem's usual configuration (for S3: `AWS_*` variables,
`~/.aws/config`, `AWS_ENDPOINT_URL` for an S3-compatible server). A `pipe:CMD` location runs CMD in a shell and
reads its output (webdataset's convention, e.g. `pipe:aws s3 cp s3://bucket/0.tar -`); it is taken only from the
command line, never from a file a dataset carries.

Every byte read from a shard is counted per process (`bytes_read()`), which is how the data path shows that each
process reads only its own share.
"""

import io
import os
import posixpath
from typing import Any, BinaryIO

import fsspec
from webdataset import gopen

from mdcore.errors import UserInputError, first_line

__all__ = ["is_url", "join", "basename", "open_location", "location_exists", "list_locations", "read_bytes",
           "bytes_read", "CountingReader"]

_BYTES_READ = 0  # by this process (a DataLoader worker counts its own)


def is_url(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def join(root: str, name: str) -> str:
    """`name` inside the directory `root` (a path or a URL)."""
    return posixpath.join(root.rstrip("/"), name) if is_url(root) else os.path.join(root, name)


def basename(location: str) -> str:
    return posixpath.basename(location.rstrip("/").split("?", 1)[0]) if is_url(location) else \
        os.path.basename(location)


class CountingReader(io.RawIOBase):
    """A read-only stream that counts what passes through it into this process's `bytes_read()`."""

    def __init__(self, stream: BinaryIO):
        super().__init__()
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        global _BYTES_READ
        data = self.stream.read(len(buffer))
        buffer[:len(data)] = data
        _BYTES_READ += len(data)
        return len(data)

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            super().close()


def bytes_read() -> int:
    """Bytes this process has read from shards so far."""
    return _BYTES_READ


def _filesystem(url: str):
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UserInputError(f"cannot read {url}: {first_line(e)}") from e


def open_location(location: str) -> BinaryIO:
    """A buffered binary stream of the file at `location`, counted in `bytes_read()` (the caller closes it)."""
    if location.startswith("pipe:"):
        raw = gopen(location, "rb")
    elif is_url(location):
        fs, path = _filesystem(location)
        raw = fs.open(path, "rb", block_size=4 * 1024 * 1024)
    else:
        raw = open(location, "rb", buffering=0)
    return io.BufferedReader(CountingReader(raw), buffer_size=1024 * 1024)


def read_bytes(location: str, max_bytes: int) -> bytes:
    """The whole (small) file at `location`, at most `max_bytes` of it, or `UserInputError`."""
    try:
        with open_location(location) as stream:
            data = stream.read(max_bytes + 1)
    except FileNotFoundError as e:
        raise UserInputError(f"{location} not found") from e
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read {location}: {first_line(e)}") from e
    if len(data) > max_bytes:
        raise UserInputError(f"{location} is larger than {max_bytes} bytes")
    return data


def location_exists(location: str) -> bool:
    """Whether a file exists at `location` (a network failure is a `UserInputError`, not a no)."""
    if not is_url(location):
        return os.path.isfile(location)
    if location.startswith("pipe:"):
        return True  # only running the command tells
    fs, path = _filesystem(location)
    try:
        return bool(fs.isfile(path))
    except FileNotFoundError:
        return False
    except Exception as e:  # noqa: BLE001 - aiohttp, botocore and friends raise their own types
        raise UserInputError(f"cannot reach {location}: {first_line(e)}") from e


def list_locations(directory: str, suffix: str) -> list[str]:
    """The files named `*suffix` directly in the remote `directory` (for filesystems that list: s3, gs, ...)."""
    fs, path = _filesystem(directory)
    try:
        entries: list[Any] = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    except NotImplementedError:
        return []
    except Exception as e:  # noqa: BLE001 - aiohttp, botocore and friends raise their own types
        raise UserInputError(f"cannot reach {directory}: {first_line(e)}") from e
    protocol = directory.split("://", 1)[0]
    names = [e["name"] for e in entries if e.get("type") == "file" and e["name"].endswith(suffix)]
    return [n if "://" in n else f"{protocol}://{n.lstrip('/')}" for n in names]
