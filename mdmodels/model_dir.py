"""Writing model directories in open_clip's local-dir layout.

    open_clip_config.json         {"model_cfg": ..., "preprocess_cfg": ...}
    open_clip_model.safetensors   the weights
    mobiledistill.json            provenance (command, recipe, teachers, data, steps, seed) and the last evaluation
    tokenizer files               for Hugging Face text towers (open_clip's local-dir loader reads them there)

`open_clip.create_model_and_transforms("local-dir:PATH")` loads it with no mobiledistill code. The directory is
built under a temporary name and renamed when complete, so a crash never leaves something that looks finished.
"""

import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

from mdcore.atomic import atomic_directory, hidden_temporary, write_json_atomic
from mdcore.jsonio import read_json_file

__all__ = ["save_model_dir", "write_model_files", "read_provenance", "update_provenance", "is_model_dir", "CONFIG_NAME",
           "PROVENANCE_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
PROVENANCE_NAME = "mobiledistill.json"


def is_model_dir(path: str | Path) -> bool:
    """Whether `path` is a finished model directory: its config is written last, so its presence says so."""
    return (Path(path) / CONFIG_NAME).is_file()


def save_model_dir(
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    out_dir: str | Path,
    tokenizer: Any = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as an open_clip local-dir model directory at `out_dir` (atomically)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists")
    with atomic_directory(out_dir) as tmp:
        write_model_files(model, model_cfg, tmp, tokenizer, provenance)
    return out_dir


def write_model_files(model: torch.nn.Module, model_cfg: dict[str, Any], directory: str | Path, tokenizer: Any = None,
                      provenance: dict[str, Any] | None = None) -> None:
    """Write the model files into an existing directory, each atomically, `open_clip_config.json` last.

    Used directly for run directories, which hold logs and checkpoints beside the model: without its config a
    directory does not load as a model, so a crash mid-write never leaves something that looks finished.
    """
    directory = Path(directory)
    # safetensors refuses shared storage: clone so tied tensors are saved as plain copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp_weights = hidden_temporary(directory / WEIGHTS_NAME)
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    os.chmod(tmp_weights, 0o644)
    os.replace(tmp_weights, directory / WEIGHTS_NAME)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
    write_json_atomic(directory / PROVENANCE_NAME, provenance or {})
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    write_json_atomic(directory / CONFIG_NAME, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})


def read_provenance(model_dir: str | Path) -> dict[str, Any]:
    """`mobiledistill.json` of a model directory ({} when there is none); a corrupt one is a `UserInputError`."""
    path = Path(model_dir) / PROVENANCE_NAME
    return read_json_file(path) if path.is_file() else {}


def update_provenance(model_dir: str | Path, **entries: Any) -> None:
    """Merge `entries` into `mobiledistill.json` (e.g. the last evaluation), replacing the file atomically."""
    data = read_provenance(model_dir)
    data.update(entries)
    write_json_atomic(Path(model_dir) / PROVENANCE_NAME, data)
