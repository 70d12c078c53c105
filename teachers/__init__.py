"""Teachers and captioners: frozen teachers and ensembles by model spec, CoCa captioners with a key-value-cached
decoder, and the jobs that run them over image-text shards: `reinforce` (write a reinforced dataset) and
`extend_reinforced` (add a captioner's caption set or a teacher to one).

Above `reinforced_data` (whose shards, augmentations and storage the jobs use) and `mdmodels`; below `distill`.
"""

import mdcore  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
from teachers.captioner import Captioner, load_captioner
from teachers.extend import extend_reinforced
from teachers.reinforce import ReinforceConfig, reinforce
from teachers.teacher import Teacher, TeacherEnsemble, load_ensemble, load_teacher

__all__ = ["Captioner", "load_captioner", "Teacher", "TeacherEnsemble", "load_ensemble", "load_teacher",
           "ReinforceConfig", "reinforce", "extend_reinforced"]
