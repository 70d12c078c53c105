"""The architectures that ship with mobiledistill, registered into open_clip's model-config registry.

They are plain open_clip JSON configs (open_clip `add_model_config`), so `open_clip.create_model("md-teacher-s")`
works once this module has run, and a model directory written by mobiledistill never needs our code to load.
"""

import json
from pathlib import Path

import open_clip
from open_clip.factory import _MODEL_CONFIGS

__all__ = ["CONFIG_DIR", "SHIPPED_ARCHITECTURES", "register_model_configs", "list_architectures"]

CONFIG_DIR = Path(__file__).parent / "model_configs"
SHIPPED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))


def register_model_configs() -> None:
    """Add every shipped config to open_clip's registry; a name that open_clip already means otherwise is an error."""
    for path in sorted(CONFIG_DIR.glob("*.json")):
        cfg = json.loads(path.read_text())
        existing = _MODEL_CONFIGS.get(path.stem)
        if existing is not None and existing != cfg:
            raise RuntimeError(f"architecture {path.stem!r} is already registered in open_clip with another config")
    open_clip.add_model_config(CONFIG_DIR)


def list_architectures() -> dict[str, list[str]]:
    """Shipped architectures and every other open_clip architecture, by source."""
    shipped = list(SHIPPED_ARCHITECTURES)
    return {"mobiledistill": shipped, "open_clip": [m for m in open_clip.list_models() if m not in shipped]}
