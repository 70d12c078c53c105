"""Guards on the paths a command writes: never over, into or around one of its inputs, never under a file.

A directory output (`--out` of train, reinforce, distill, export) is filled or replaced, so it may not be an input,
lie inside one, or contain one: `export --model D --out D --overwrite` would otherwise delete the model it reads.
A file output (`--json`, `--html`) may be written inside an input directory (`bench EXPORT --json EXPORT/bench.json`)
but never replaces a file the input is read through, nor any file that is not JSON or HTML there.
"""

import os
from collections.abc import Iterable
from pathlib import Path

from mdcore.errors import UserInputError
from mdcore.names import CHECKPOINTS, PROTECTED_NAMES, SHARD_STATS_SUFFIX

__all__ = ["input_paths", "check_output"]

_REPORT_SUFFIXES = (".json", ".html", ".htm")


def input_paths(values: Iterable[str | Path | None] | str | Path | None) -> list[Path]:
    """The local files and directories that command arguments name (model specs, data paths, shard patterns);
    architectures, hub ids and URLs name none."""
    if values is None or isinstance(values, (str, Path)):
        values = [values]
    paths = []
    for value in values:
        if value is None or not str(value).strip():
            continue
        text = str(value)
        if text.startswith("local-dir:"):
            text = text[len("local-dir:"):]
        elif "://" in text or text.startswith(("hf-hub:", "pipe:")):
            continue
        if "{" in text or "*" in text:  # a shard pattern: the directory it lies in
            text = os.path.dirname(text[:min(i for i in (text.find("{"), text.find("*")) if i >= 0)]) or "."
        path = Path(text).expanduser()
        if path.exists():
            paths.append(path.resolve())
    return paths


def _inside(path: Path, parent: Path) -> bool:
    return path != parent and path.is_relative_to(parent)


def _check_location(out: Path, option: str, kind: str) -> None:
    if kind == "file" and out.is_dir():
        raise UserInputError(f"{option} {out} is a directory (expected a file name)")
    if kind == "directory" and out.exists() and not out.is_dir():
        raise UserInputError(f"{option} {out} is a file (expected a directory)")
    ancestor = out.parent if kind == "file" or not out.exists() else out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserInputError(f"{option} {out} is under {ancestor}, which is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserInputError(f"{option} {out}: {ancestor} is not writable")


def check_output(out: str | Path, inputs: Iterable[str | Path | None], option: str = "--out",
                 kind: str = "directory") -> None:
    """Raise `UserInputError` when writing `out` (a "directory" or a "file") could destroy one of `inputs`, or
    cannot succeed (under a file, a directory where a file is expected, not writable)."""
    out = Path(out).expanduser()
    _check_location(out, option, kind)
    target = out.resolve()
    for source in input_paths(inputs):
        if target == source:
            raise UserInputError(f"{option} {out} is an input of this command; write to another path")
        if _inside(source, target):
            raise UserInputError(f"{option} {out} contains the input {source}; write to another path")
        if not _inside(target, source):
            continue
        if kind == "directory":
            raise UserInputError(f"{option} {out} is inside the input {source}; write to another path")
        if target.name in PROTECTED_NAMES or target.name.endswith(SHARD_STATS_SUFFIX) or (
                CHECKPOINTS in target.relative_to(source).parts) or (
                target.exists() and not target.name.endswith(_REPORT_SUFFIXES)):
            raise UserInputError(f"{option} {out} would replace a file of the input {source}; write to another path")
