"""The names of the files mobiledistill writes and reads, in one place (each reader and writer imports them)."""

__all__ = [
    "MODEL_CONFIG", "MODEL_WEIGHTS", "PROVENANCE", "RUN_LOG", "RUN_RECIPE", "STAGES_RECIPE", "CHECKPOINTS",
    "REINFORCED_CONFIG", "REINFORCE_RUN", "EXTEND_RUN", "SHARD_STATS_SUFFIX", "DATASET_MANIFEST", "NSHARDS",
    "CLASSNAMES", "TEMPLATES", "EXPORT_REPORT", "PREPROCESS", "TOKENIZER", "BENCH", "LOCK", "PROTECTED_NAMES",
]

# model and run directories (open_clip's local-dir layout, and what training adds)
MODEL_CONFIG = "open_clip_config.json"
MODEL_WEIGHTS = "open_clip_model.safetensors"
PROVENANCE = "mobiledistill.json"
RUN_LOG = "log.jsonl"
RUN_RECIPE = "recipe.yaml"
STAGES_RECIPE = "stages.yaml"
CHECKPOINTS = "checkpoints"

# datasets
REINFORCED_CONFIG = "config.json"  # DataCompDR's name; written last, it marks a reinforced dataset complete
REINFORCE_RUN = "reinforce_run.json"  # the arguments of an unfinished reinforce run
EXTEND_RUN = "extend_run.json"  # what an unfinished `reinforce --add-to` is adding
SHARD_STATS_SUFFIX = ".stats.json"  # beside each reinforced shard: its counts and skipped samples
DATASET_MANIFEST = "manifest.json"
NSHARDS = "nshards.txt"
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"

# export directories
EXPORT_REPORT = "export_report.json"
PREPROCESS = "preprocess.json"
TOKENIZER = "tokenizer.json"
BENCH = "bench.json"

LOCK = ".mobiledistill.lock"  # held by the process that owns a directory being written

# Files an input is read through: an output file never replaces one of these (nor any file that is not JSON or
# HTML) inside an input directory.
PROTECTED_NAMES = frozenset({
    MODEL_CONFIG, MODEL_WEIGHTS, PROVENANCE, RUN_LOG, RUN_RECIPE, STAGES_RECIPE, REINFORCED_CONFIG, REINFORCE_RUN,
    EXTEND_RUN,
    DATASET_MANIFEST, NSHARDS, CLASSNAMES, TEMPLATES, EXPORT_REPORT, PREPROCESS, TOKENIZER, LOCK,
    "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "step.json", "state.json",
})
