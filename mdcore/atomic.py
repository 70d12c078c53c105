"""Atomic file and directory writing: readers see the old version or the whole new one, never a half-written one.

Everything is first written to a hidden sibling named `.NAME.tmp-PID` and then renamed over the final name, so a
crash leaves only a hidden temporary, which no reader takes for output.
"""

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["hidden_temporary", "write_text_atomic", "write_json_atomic", "copy_file_atomic", "atomic_directory"]


def hidden_temporary(path: Path) -> Path:
    """The hidden sibling a file or directory is written to before its rename (`.NAME.tmp-PID`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a hidden temporary file and a rename: readers see the old file or the whole
    new one, never a half-written one (a crash leaves only the hidden temporary)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden_temporary(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """`data` as indented JSON, written with `write_text_atomic` (values JSON lacks are written as strings)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def copy_file_atomic(source: str | Path, destination: str | Path) -> None:
    """Copy `source` to `destination` the way `write_text_atomic` writes: readers never see a partial copy."""
    destination = Path(destination)
    tmp = hidden_temporary(destination)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to fill; on success it replaces `out_dir`, on any error it is removed.

    Readers never see a half-written directory under the final name."""
    out_dir = Path(out_dir)
    tmp = hidden_temporary(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
