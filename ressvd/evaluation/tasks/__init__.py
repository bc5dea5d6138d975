"""lm-eval task configs over the local data files (one YAML per task, converters.py for the data).

The YAML files are ordinary lm-eval task configs: `TaskManager(include_path=TASKS_DIR,
include_defaults=False)` indexes them under lm-eval's own task names. Each one restates lm-eval's
definition of the task (prompt, choices, target, metrics) and replaces only the hub dataset by a
`custom_dataset` converter that reads the local file into the hub schema.
"""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

# The seven zero-shot tasks of the ResSVD / SVD-LLM evaluation protocol (docs: methods.md §3).
LOCAL_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "openbookqa", "mathqa")

__all__ = ["LOCAL_TASKS", "TASKS_DIR"]
