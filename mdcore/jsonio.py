"""Reading JSON that came from outside: bounded in size and nesting, one clear error when it is malformed.

Configs, logs, checkpoint records and dataset members are all input a user (or a hostile file) controls. Reading
them must never allocate without bound nor end in a traceback: files larger than a limit are refused before they
are read, nesting deeper than a limit is refused after parsing, and every failure is one line.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mdcore.errors import UserInputError, first_line

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "parse_json", "read_json_file", "read_jsonl_file"]

MAX_JSON_BYTES = 64 * 1024 * 1024  # configs, reports and logs are kilobytes to a few megabytes
MAX_JSON_DEPTH = 32  # the deepest file mobiledistill writes nests 6 levels


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_json(data: bytes | str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse `data`, or raise ValueError with the reason as a phrase that follows "is" ("not valid JSON (...)",
    "larger than N bytes", "nested too deeply", "not UTF-8")."""
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text)
    except UnicodeDecodeError as e:
        raise ValueError("not UTF-8") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno})") from e
    except RecursionError as e:
        raise ValueError("nested too deeply") from e
    if _depth_exceeds(value, max_depth):
        raise ValueError(f"nested deeper than {max_depth} levels")
    return value


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    try:
        if not path.is_file():
            raise UserInputError(f"{path} is not a file" if path.exists() else f"{path} not found")
        if path.stat().st_size > max_bytes:
            raise UserInputError(f"{path} is larger than {max_bytes} bytes")
        return path.read_bytes()
    except OSError as e:
        raise UserInputError(f"cannot read {path}: {first_line(e)}") from e


def read_json_file(path: str | Path, max_bytes: int = MAX_JSON_BYTES, expect: type | None = dict) -> Any:
    """The JSON value in `path` (of type `expect` unless None), or a `UserInputError` naming the file."""
    path = Path(path)
    data = _read_bounded(path, max_bytes)
    try:
        value = parse_json(data, max_bytes)
    except ValueError as e:
        raise UserInputError(f"{path} is {e}") from e
    if expect is not None and not isinstance(value, expect):
        raise UserInputError(f"{path} does not hold a JSON {'object' if expect is dict else expect.__name__}")
    return value


def read_jsonl_file(path: str | Path, max_bytes: int = MAX_JSON_BYTES, tolerate_torn_end: bool = True
                    ) -> Iterator[dict[str, Any]]:
    """The objects of a JSON-lines file, one per line. A last line without its newline that does not parse (a
    writer killed mid-line) is dropped when `tolerate_torn_end`; any other bad line is a `UserInputError`."""
    path = Path(path)
    text = _read_bounded(path, max_bytes)
    lines = text.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = parse_json(line, max_bytes)
        except ValueError as e:
            if tolerate_torn_end and number == len(lines):  # no newline after it: the write was cut short
                return
            raise UserInputError(f"{path} line {number} is {e}") from e
        if not isinstance(value, dict):
            raise UserInputError(f"{path} line {number} is not a JSON object")
        yield value
