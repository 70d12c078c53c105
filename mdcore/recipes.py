"""Recipes: a YAML mapping of a config dataclass's keys (nested dataclasses as nested mappings or dotted keys), plus
`key=value` overrides from the command line.

Unknown keys are errors (a typo must not silently fall back to a default), and every value is checked against the
field's annotation before it is set. `distill.recipe` (distillation), `distill.teacher_training` (teacher training)
and the quickstart read their recipes through this one loader.
"""

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from mdcore.configs import matches_type, type_name
from mdcore.errors import UserInputError, first_line

__all__ = ["MAX_RECIPE_BYTES", "read_recipe_file", "set_key", "typed_value", "apply_overrides", "apply_mapping"]

MAX_RECIPE_BYTES = 1024 * 1024


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The mapping a recipe file holds, or a `UserInputError` saying in one line why it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"recipe not found: {path}")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise UserInputError(f"{path} is larger than {MAX_RECIPE_BYTES} bytes: not a recipe")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise UserInputError(f"{path} is not UTF-8 text") from e
    except (yaml.YAMLError, RecursionError) as e:
        raise UserInputError(f"{path} is not valid YAML: {first_line(e)}") from e
    if not isinstance(data, dict):
        raise UserInputError(f"{path} must hold a mapping of recipe keys")
    return data


def set_key(config: Any, dotted: str, value: Any) -> None:
    """Set the (dotted) key of a config dataclass, checked against its annotation; a mapping fills a nested
    dataclass key by key."""
    *parents, leaf = str(dotted).split(".")
    target = config
    for name in parents:
        if not dataclasses.is_dataclass(target) or not hasattr(target, name):
            raise UserInputError(f"unknown recipe key {dotted!r}")
        target = getattr(target, name)
    fields = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
    if leaf not in fields:
        raise UserInputError(f"unknown recipe key {dotted!r} (known: {', '.join(sorted(fields))})")
    if dataclasses.is_dataclass(getattr(target, leaf)):
        if not isinstance(value, dict):
            raise UserInputError(f"recipe key {dotted!r} takes a mapping")
        for key, sub in value.items():
            set_key(config, f"{dotted}.{key}", sub)
        return
    setattr(target, leaf, typed_value(value, typing.get_type_hints(type(target))[leaf], dotted))


def typed_value(value: Any, hint: Any, key: str) -> Any:
    """`value` as the recipe key `key` (annotated `hint`) takes it, or a `UserInputError`: a float key also takes
    an integer, and the strings YAML 1.1 leaves `3e-4` (no dot) as."""
    if hint is float or float in typing.get_args(hint):  # a float key
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
    if not matches_type(value, hint):
        raise UserInputError(f"recipe key {key!r} takes {type_name(hint)}, got {value!r}")
    return value


def apply_mapping(config: Any, mapping: dict[str, Any]) -> Any:
    """Set every key of `mapping` (a recipe file's content) on `config`; returns `config`."""
    for key, value in mapping.items():
        set_key(config, key, value)
    return config


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Apply `key=value` strings (nested keys dotted: `loss.w_kd=0.5`); values are read as YAML. Returns `config`."""
    for item in overrides:
        if "=" not in item:
            raise UserInputError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError as e:
            raise UserInputError(f"override {item!r}: the value is not valid YAML ({first_line(e)})") from e
        set_key(config, key.strip(), parsed)
    return config
