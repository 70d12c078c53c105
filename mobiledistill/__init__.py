"""The application: the `mobiledistill` command line, the quickstart, progressive inheritance stages and the HTML
report. The top layer: it imports the library packages, and none of them imports it.

    mobiledistill   CLI, quickstart, stages, report
    export          towers, formats, quantization, parity, latency
    distill         losses, inheritance, pruning, training (students and teachers), evaluation
    teachers        frozen teachers, ensembles, captioners; the reinforce and extend jobs
    reinforced_data shards, augmentation, the input pipeline, the reinforced-dataset layout
    mdmodels        model specs, shipped configs, variable-width towers, model directories
    mdcore          errors, atomic I/O, file names, locks, bounded JSON
"""

import mdcore  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
