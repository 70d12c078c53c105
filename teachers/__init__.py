"""Teachers and captioners: load any model spec, ensemble teachers, generate captions, train or fine-tune them.

Importing this package registers mobiledistill's shipped architectures (`md-teacher-s`, `md-teacher-m`,
`md-coca-tiny`, `md-student-tiny`, ...) with open_clip, and teaches open_clip's tower builders the per-layer
head counts and MLP widths of automatically inherited models (`teachers.pruned`). The other public names load on
first use, so that importing the package stays cheap and free of import cycles with `reinforced_data` and
`distill`.
"""

import importlib

from teachers.pruned import register_variable_width_towers
from teachers.registry import SHIPPED_ARCHITECTURES, list_architectures, register_model_configs

register_model_configs()
register_variable_width_towers()  # towers with per-layer head counts and MLP widths (automatic inheritance)

_LAZY = {
    "Captioner": "teachers.captioner",
    "load_captioner": "teachers.captioner",
    "read_provenance": "teachers.model_dir",
    "save_model_dir": "teachers.model_dir",
    "update_provenance": "teachers.model_dir",
    "LoadedModel": "teachers.specs",
    "ModelSpec": "teachers.specs",
    "load_model": "teachers.specs",
    "model_config_of": "teachers.specs",
    "parse_model_spec": "teachers.specs",
    "Teacher": "teachers.teacher",
    "TeacherEnsemble": "teachers.teacher",
    "load_ensemble": "teachers.teacher",
    "load_teacher": "teachers.teacher",
    "TeacherTrainConfig": "teachers.train",
    "train_teacher": "teachers.train",
}

__all__ = ["SHIPPED_ARCHITECTURES", "list_architectures", "register_model_configs", "register_variable_width_towers",
           *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'teachers' has no attribute {name!r}")
