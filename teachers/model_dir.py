"""Writing model directories in open_clip's local-dir layout.

    open_clip_config.json         {"model_cfg": ..., "preprocess_cfg": ...}
    open_clip_model.safetensors   the weights
    mobiledistill.json            provenance (command, recipe, teachers, data, steps, seed) and the last evaluation
    tokenizer files               for Hugging Face text towers (open_clip's local-dir loader reads them there)

`open_clip.create_model_and_transforms("local-dir:PATH")` loads it with no mobiledistill code. The directory is
built under a temporary name and renamed when complete, so a crash never leaves something that looks finished.
"""

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

__all__ = ["save_model_dir", "write_model_files", "atomic_directory", "read_provenance", "update_provenance",
           "write_text_atomic", "write_json_atomic", "copy_file_atomic", "hidden_temporary", "PROVENANCE_NAME",
           "WEIGHTS_NAME"]

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
PROVENANCE_NAME = "mobiledistill.json"


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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a hidden temporary file and a rename: readers see the old file or the whole
    new one, never a half-written one (a crash leaves only the hidden temporary)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden_temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def copy_file_atomic(source: str | Path, destination: str | Path) -> None:
    """Copy `source` to `destination` the way `write_text_atomic` writes: readers never see a partial copy."""
    destination = Path(destination)
    tmp = hidden_temporary(destination)
    shutil.copyfile(source, tmp)
    os.replace(tmp, destination)


def hidden_temporary(path: Path) -> Path:
    """The hidden sibling a file or directory is written to before its rename (`.NAME.tmp-PID`)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """`data` as indented JSON, written with `write_text_atomic` (values JSON lacks are written as strings)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_provenance(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / PROVENANCE_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def update_provenance(model_dir: str | Path, **entries: Any) -> None:
    """Merge `entries` into `mobiledistill.json` (e.g. the last evaluation), replacing the file atomically."""
    data = read_provenance(model_dir)
    data.update(entries)
    write_json_atomic(Path(model_dir) / PROVENANCE_NAME, data)
