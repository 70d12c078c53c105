"""Teachers and captioners: load any model spec, ensemble teachers, generate captions, train or fine-tune them.

Importing this package registers mobiledistill's shipped architectures (`md-teacher-s`, `md-teacher-m`,
`md-coca-tiny`, `md-student-tiny`, ...) with open_clip.
"""

from teachers.registry import SHIPPED_ARCHITECTURES, list_architectures, register_model_configs

register_model_configs()

from teachers.captioner import Captioner, load_captioner  # noqa: E402
from teachers.model_dir import read_provenance, save_model_dir, update_provenance  # noqa: E402
from teachers.specs import LoadedModel, ModelSpec, load_model, model_config_of, parse_model_spec  # noqa: E402
from teachers.teacher import Teacher, TeacherEnsemble, load_ensemble, load_teacher  # noqa: E402
from teachers.train import TeacherTrainConfig, train_teacher  # noqa: E402

__all__ = [
    "SHIPPED_ARCHITECTURES",
    "Captioner",
    "LoadedModel",
    "ModelSpec",
    "Teacher",
    "TeacherEnsemble",
    "TeacherTrainConfig",
    "list_architectures",
    "load_captioner",
    "load_ensemble",
    "load_model",
    "load_teacher",
    "model_config_of",
    "parse_model_spec",
    "read_provenance",
    "register_model_configs",
    "save_model_dir",
    "train_teacher",
    "update_provenance",
]
