"""Checking configuration dataclasses (recipes, command options) against their annotations and ranges.

A recipe key, a `key=value` override or a command-line option that has the wrong type or an impossible value is a
`UserInputError` naming the key, raised before anything runs, never a traceback hours later.
"""

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from typing import Any

from mdcore.errors import UserInputError

__all__ = ["MAX_IMAGE_SIDE", "matches_type", "type_name", "check_types", "check_range", "check_choice"]

MAX_IMAGE_SIDE = 4096  # the largest image side a config may ask for (80000 px asked for 76.8 GB)


def matches_type(value: Any, hint: Any) -> bool:
    """Whether `value` fits the annotation `hint` (ints stand for floats; bools are not numbers)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, arg) for arg in typing.get_args(hint))
    if hint is None or hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(matches_type(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def type_name(hint: Any) -> str:
    """How an annotation reads in a message: `int`, `list[str]`, `str | None`."""
    if typing.get_origin(hint) is None and isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def check_types(config: Any, prefix: str = "") -> None:
    """Every field of the dataclass `config` (and of nested ones) matches its annotation, or `UserInputError`."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_types(value, f"{prefix}{f.name}.")
        elif not matches_type(value, hints[f.name]):
            raise UserInputError(f"{prefix}{f.name} takes {type_name(hints[f.name])}, got {value!r}")


def check_range(name: str, value: float | None, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """`low <= value <= high` (`low < value` with `low_open`), finite; None passes (an unset optional)."""
    if value is None:
        return
    if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or (
            high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low}" if high is None else \
            f"in {'(' if low_open else '['}{low}, {high}]"
        raise UserInputError(f"{name} must be {bounds}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise UserInputError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
