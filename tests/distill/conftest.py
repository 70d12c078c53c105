"""A small reinforced dataset (one teacher, no captions) shared by the distillation tests of the session."""

from pathlib import Path

import pytest

from reinforced_data.augment import AugmentationConfig
from reinforced_data.writer import ReinforceConfig, reinforce
from tests.conftest import write_shapes_root


@pytest.fixture(scope="session")
def one_teacher_reinforced(tmp_path_factory, tiny_model_dirs) -> Path:
    root = write_shapes_root(tmp_path_factory.mktemp("data") / "shapes", per_pair=2, size=64)
    out = tmp_path_factory.mktemp("dr") / "dr"
    reinforce(str(root), [str(tiny_model_dirs["teacher_a"])], out,
              ReinforceConfig(num_augs=2, num_captions=0, dtype="fp16",
                              augmentation=AugmentationConfig(size=64, scale=(0.5, 1.0))), progress=False)
    return out
