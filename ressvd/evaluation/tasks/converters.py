"""Local data files -> the Hugging Face hub schema that lm-eval's own task definitions read.

Each function is a `custom_dataset` for one YAML config in this folder: lm-eval calls it with the
config's `dataset_kwargs` (plus its metadata, ignored here) and gets a `datasets.DatasetDict` whose
rows look like the hub dataset the stock task loads, so the prompt templates, choice lists and
`process_docs` functions apply unchanged. Nothing is written to disk: the files are small and
converting them takes well under a second (HellaSwag, the largest, about one).

Files are found under the data folder ($RESSVD_DATA, else ../shared/data; see ressvd.data.paths).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from ...data.paths import ENV_VAR, data_file
from ...data.texts import DatasetNotFoundError


def local_path(relative: str) -> Path:
    path = data_file(relative)
    if path is None:
        raise DatasetNotFoundError(
            f"zero-shot data file {relative!r} not found under the data folder (${ENV_VAR} or ../shared/data); "
            "set $RESSVD_DATA, or use lm-eval's hub tasks with --hub-tasks")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_labels(path: Path) -> list[int]:
    with open(path, encoding="utf-8") as f:
        return [int(line) for line in f if line.strip()]


def _dataset(split: str, rows: list[dict]):
    import datasets
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


# --- one converter per source format: rows in the hub schema ------------------------------------

def arc_rows(records: list[dict]) -> list[dict]:
    """ARC-V1-Feb2018 / OpenBookQA JSONL ({"question": {"stem", "choices": [{text, label}]}}) ->
    allenai/ai2_arc rows: {"id", "question", "choices": {"text": [...], "label": [...]}, "answerKey"}."""
    return [{"id": r["id"], "question": r["question"]["stem"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]},
             "answerKey": r["answerKey"]} for r in records]


def openbookqa_rows(records: list[dict]) -> list[dict]:
    """OpenBookQA Main JSONL -> allenai/openbookqa `main` rows: {"id", "question_stem", "choices", "answerKey"}."""
    return [{"id": row["id"], "question_stem": row["question"], "choices": row["choices"],
             "answerKey": row["answerKey"]} for row in arc_rows(records)]


def piqa_rows(records: list[dict], labels: list[int]) -> list[dict]:
    """valid.jsonl + valid-labels.lst (aligned by line) -> baber/piqa rows: {"goal", "sol1", "sol2", "label"}."""
    if len(records) != len(labels):
        raise ValueError(f"PIQA: {len(records)} items but {len(labels)} labels")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": label}
            for r, label in zip(records, labels)]


def winogrande_rows(records: list[dict], labels: list[int] | None = None) -> list[dict]:
    """dev.jsonl (already carries "answer") -> allenai/winogrande rows; the labels file, when given,
    must agree with every "answer"."""
    if labels is not None:
        if len(labels) != len(records):
            raise ValueError(f"WinoGrande: {len(records)} items but {len(labels)} labels")
        bad = [i for i, (r, label) in enumerate(zip(records, labels)) if str(label) != str(r["answer"])]
        if bad:
            raise ValueError(f"WinoGrande: the labels file disagrees with dev.jsonl at items {bad[:5]}")
    return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"],
             "answer": str(r["answer"])} for r in records]


def hellaswag_rows(lines: list[str]) -> list[dict]:
    """llama.cpp HellaSwag text (6 lines an item: "activity_label: ctx", gold, 4 endings) ->
    Rowan/hellaswag-shaped rows.

    The text form keeps only the joined, already preprocessed context, so it becomes ctx_a with an
    empty ctx_b; lm-eval's process_docs then builds `activity_label + ": " + ctx_a + " " +
    ctx_b.capitalize()` and reapplies its own preprocess. What cannot be recovered: lm-eval
    capitalises ctx_b (the start of the last sentence, "he" -> "He") and lowercases the rest of it;
    here that fragment keeps its original case. The upstream converter also stripped only the
    [header]/[step]/[substeps]/[title] tags where lm-eval strips every bracketed span.
    """
    if len(lines) % 6:
        raise ValueError(f"HellaSwag text: {len(lines)} lines is not a multiple of 6")
    rows = []
    for i in range(0, len(lines), 6):
        head, gold, endings = lines[i], lines[i + 1], lines[i + 2:i + 6]
        label, sep, ctx = head.partition(": ")
        if not sep:
            label, ctx = "", head
        if gold.strip() not in {"0", "1", "2", "3"}:
            raise ValueError(f"HellaSwag text: item {i // 6} has gold label {gold!r}")
        rows.append({"ind": i // 6, "activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                     "endings": list(endings), "label": gold.strip()})
    return rows


def mathqa_rows(records: list[dict]) -> list[dict]:
    """MathQA test.json (one JSON array) is already the regisss/math_qa row format."""
    keys = ("Problem", "Rationale", "options", "correct", "annotated_formula", "linear_formula", "category")
    return [{k: r[k] for k in keys} for r in records]


# --- the `custom_dataset` callables named in the YAML configs -----------------------------------

def arc(data_file: str, split: str = "test", **_: Any):
    return _dataset(split, arc_rows(_read_jsonl(local_path(data_file))))


def openbookqa(data_file: str, split: str = "test", **_: Any):
    return _dataset(split, openbookqa_rows(_read_jsonl(local_path(data_file))))


def piqa(data_file: str, labels_file: str, split: str = "validation", **_: Any):
    return _dataset(split, piqa_rows(_read_jsonl(local_path(data_file)), _read_labels(local_path(labels_file))))


def winogrande(data_file: str, labels_file: str | None = None, split: str = "validation", **_: Any):
    labels = _read_labels(local_path(labels_file)) if labels_file else None
    return _dataset(split, winogrande_rows(_read_jsonl(local_path(data_file)), labels))


def hellaswag(data_file: str, split: str = "validation", **_: Any):
    path = local_path(data_file)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return _dataset(split, hellaswag_rows(lines))


def mathqa(data_file: str, split: str = "test", **_: Any):
    with open(local_path(data_file), encoding="utf-8") as f:
        return _dataset(split, mathqa_rows(json.load(f)))
