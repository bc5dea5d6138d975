"""Zero-shot accuracy with lm-evaluation-harness, on the model object in memory.

The model goes to lm-eval as `HFLM(pretrained=model, tokenizer=tokenizer)`, so a compressed
checkpoint (linears replaced by LowRankLinear) needs no loader of its own there. Tasks come from
the local data files through the configs in `ressvd.evaluation.tasks` (lm-eval's own task
definitions over local files, under lm-eval's task names), or, with `hub=True`, from lm-eval's
own registry and the Hugging Face hub (any lm-eval task name then works).

Protocol: 0-shot, loglikelihood multiple choice; acc and acc_norm (lm-eval's length-normalised
accuracy; WinoGrande has acc only) with lm-eval's standard errors. `limit=N` scores the first N
items of each task (lm-eval's --limit: the first N, not a random sample).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

from .tasks import LOCAL_TASKS, TASKS_DIR

ZEROSHOT_TASKS = LOCAL_TASKS
METRICS = ("acc", "acc_norm")
NOTES = {
    "hellaswag": "local: llama.cpp text form of the validation set; lm-eval's prompt capitalises the "
                 "start of the last context sentence (ctx_b), this one keeps its case, so scores are "
                 "close to, not identical with, lm-eval's hellaswag",
}


def parse_tasks(spec: str) -> list[str]:
    """'arc_easy,piqa' -> ['arc_easy', 'piqa']; 'all' stands for the seven tasks of the protocol."""
    names: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        for name in (ZEROSHOT_TASKS if part == "all" else [part] if part else []):
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("--tasks names no task")
    return names


class _DropExpectedWarnings(logging.Filter):
    """lm-eval warnings that this module's way of calling it always triggers: a custom_dataset (kwargs
    can be passed by --metadata), an in-memory model, num_fewshot set to 0."""
    EXPECTED = ("Custom kwargs can be passed", "Passed an already-initialized model",
                "`pretrained` model kwarg is not of type", "Overwriting default num_fewshot")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


for _name in ("lm_eval.api.task", "lm_eval.models.huggingface", "lm_eval.evaluator"):
    logging.getLogger(_name).addFilter(_DropExpectedWarnings())


def task_manager(hub: bool = False):
    from lm_eval.tasks import TaskManager
    if hub:
        return TaskManager()
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def check_tasks(names: list[str], hub: bool = False) -> None:
    """Fail early (before a model is loaded) on a name with no local config."""
    if not hub:
        unknown = [n for n in names if n not in LOCAL_TASKS]
        if unknown:
            raise ValueError(f"no local zero-shot task {', '.join(unknown)}; local tasks: {', '.join(LOCAL_TASKS)} "
                             "(use --hub-tasks for lm-eval's own hub tasks)")


def load_tasks(names: list[str], hub: bool = False, manager=None) -> dict[str, Any]:
    """lm-eval Task objects by name: the local configs, or lm-eval's registry with hub=True."""
    check_tasks(names, hub)
    import datasets
    datasets.disable_progress_bars()  # HellaSwag's process_docs maps 10k rows each time docs are read
    return (manager or task_manager(hub)).load(list(names))["tasks"]


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has no stderr
        return None
    return value if math.isfinite(value) else None


def summarize(lm_eval_output: dict, names: list[str]) -> dict[str, dict]:
    """lm-eval's results -> {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, samples, total}}."""
    results, counts = lm_eval_output["results"], lm_eval_output.get("n-samples", {})
    tasks = {}
    for name in names:
        row, entry = results[name], {}
        for metric in METRICS:
            if f"{metric},none" in row:
                entry[metric] = _number(row[f"{metric},none"])
                entry[f"{metric}_stderr"] = _number(row.get(f"{metric}_stderr,none"))
        if name in counts:
            entry["samples"] = counts[name].get("effective")
            entry["total"] = counts[name].get("original")
        tasks[name] = entry
    return tasks


def mean_accuracy(tasks: dict[str, dict], metric: str = "acc") -> float | None:
    """Unweighted mean over tasks; acc_norm falls back to acc where a task has none (WinoGrande)."""
    values = [t.get(metric, t.get("acc")) for t in tasks.values()]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def evaluate_zeroshot(model, tokenizer, tasks: list[str] | str = ZEROSHOT_TASKS, *, limit: int | None = None,
                      batch_size: int | str = 1, hub: bool = False) -> dict[str, Any]:
    """Run lm-eval 0-shot on `model` (any transformers causal LM, compressed or not).

    Returns {"tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, samples, total}},
    "source", "limit", "num_fewshot", "batch_size", "lm_eval_version", "seconds", "notes"}.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks) if isinstance(tasks, str) else list(tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive number of items, got {limit}")
    manager = task_manager(hub)  # passed on: without one, simple_evaluate indexes all of lm-eval's tasks
    loaded = load_tasks(names, hub, manager)
    root_level = logging.getLogger().level
    if root_level == logging.NOTSET or root_level >= logging.WARNING:  # lm-eval is chatty at INFO
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    start = time.perf_counter()
    output = lm_eval.simple_evaluate(model=lm, tasks=[loaded[n] for n in names], num_fewshot=0, limit=limit,
                                     log_samples=False, task_manager=manager)
    seconds = time.perf_counter() - start
    source = "hub" if hub else "local"
    return {
        "tasks": summarize(output, names),
        "source": source,
        "limit": limit,
        "num_fewshot": 0,
        "batch_size": batch_size,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "seconds": seconds,
        "notes": {n: NOTES[n] for n in names if source == "local" and n in NOTES},
    }


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of acc / acc_norm ± stderr per task, plus the mean."""
    lines = [f"{'task':<15s}{'acc':>18s}{'acc_norm':>18s}{'n':>7s}"]
    for name, t in result["tasks"].items():
        def cell(metric):
            v, s = t.get(metric), t.get(f"{metric}_stderr")
            return "-" if v is None else f"{v:.4f}" + (f" ± {s:.4f}" if s is not None else "")
        lines.append(f"{name:<15s}{cell('acc'):>18s}{cell('acc_norm'):>18s}{t.get('samples') or '':>7}")
    mean = mean_accuracy(result["tasks"])
    if mean is not None:
        mean_norm = mean_accuracy(result["tasks"], "acc_norm")
        lines.append(f"{'mean':<15s}{mean:>18.4f}{mean_norm:>18.4f}")
    return "\n".join(lines)
