"""Models: model specs and loading, the shipped open_clip configs, variable-width towers, model directories.

Importing this package registers mobiledistill's shipped architectures (`md-teacher-s`, `md-teacher-m`,
`md-coca-tiny`, `md-student-tiny`, ...) with open_clip and teaches open_clip's tower builders the per-layer head
counts and MLP widths of automatically inherited models, so that `open_clip.create_model_and_transforms` builds
them afterwards. It sits just above `mdcore` and imports no other project package.
"""

import mdcore  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
from mdmodels.model_dir import read_provenance, save_model_dir, update_provenance, write_model_files
from mdmodels.registry import SHIPPED_ARCHITECTURES, list_architectures, register_model_configs
from mdmodels.specs import LoadedModel, ModelSpec, load_model, model_config_of, parse_model_spec
from mdmodels.variable_width import register_variable_width_towers

register_model_configs()
register_variable_width_towers()

__all__ = ["SHIPPED_ARCHITECTURES", "list_architectures", "register_model_configs", "register_variable_width_towers",
           "LoadedModel", "ModelSpec", "load_model", "model_config_of", "parse_model_spec", "read_provenance",
           "save_model_dir", "update_provenance", "write_model_files"]
