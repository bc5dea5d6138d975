"""Text datasets as data: each named source says where its local file is, how to read it, and the
hub dataset to fall back on. Perplexity joins a split's rows with "\\n\\n" (the SVD-LLM protocol);
calibration draws from its documents.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .paths import ENV_VAR, data_file


def _wikitext_rows(path: Path) -> list[str]:
    # Rebuild the HF `wikitext-2-raw-v1` rows: each line with its "\n" is a row, and a blank line
    # (" \n") is the empty row "".
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append("" if line.strip() == "" else line)
    return rows


def _ptb_rows(path: Path) -> list[str]:
    # HF `ptb_text_only` yields each line stripped, in field `sentence`.
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f]


def _jsonl_texts(path: Path, field: str = "text") -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)[field] for line in f if line.strip()]


@dataclass(frozen=True)
class TextSource:
    name: str
    local_file: str | None
    reader: Callable[[Path], list[str]] | None
    hub: tuple[str, str | None, str, str] | None  # (dataset, config, split, field)
    documents: bool  # True: rows are whole documents (sample windows inside one); False: a stream


SOURCES: dict[str, TextSource] = {
    "wikitext2": TextSource("wikitext2", "wikitext2/wiki.test.raw", _wikitext_rows,
                            ("wikitext", "wikitext-2-raw-v1", "test", "text"), documents=False),
    "wikitext2-train": TextSource("wikitext2-train", None, None,
                                  ("wikitext", "wikitext-2-raw-v1", "train", "text"), documents=False),
    "ptb": TextSource("ptb", "ptb/ptb.test.txt", _ptb_rows, ("ptb_text_only", None, "test", "sentence"),
                      documents=False),
    "ptb-train": TextSource("ptb-train", "ptb/ptb.train.txt", _ptb_rows,
                            ("ptb_text_only", None, "train", "sentence"), documents=False),
    "c4": TextSource("c4", "c4/c4_validation_2k.jsonl.gz", _jsonl_texts, None, documents=True),
}


class DatasetNotFoundError(FileNotFoundError):
    pass


def _load_from_hub(source: TextSource) -> list[str]:
    if source.hub is None:
        raise DatasetNotFoundError(
            f"dataset {source.name!r} needs its local file {source.local_file!r} in the data folder "
            f"(set ${ENV_VAR}); it has no hub fallback")
    try:
        import datasets
    except ImportError as err:
        raise DatasetNotFoundError(
            f"dataset {source.name!r} is not in the data folder (set ${ENV_VAR}) and the `datasets` "
            f"package for the hub fallback is not installed") from err
    name, config, split, field = source.hub
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, or the loading script is gone (ptb_text_only on datasets>=4)
        raise DatasetNotFoundError(
            f"dataset {source.name!r} is not in the data folder (set ${ENV_VAR}) and the hub copy "
            f"{name}/{config or ''} failed to load: {err}") from err
    return list(rows[field])


def load_rows(name: str) -> list[str]:
    """Rows (or documents) of a named source or of a local .txt / .jsonl(.gz) file."""
    path = Path(name).expanduser()
    if path.suffix in (".txt", ".raw") and path.is_file():
        return path.read_text(encoding="utf-8").splitlines(keepends=True)
    if path.name.endswith((".jsonl", ".jsonl.gz")) and path.is_file():
        return _jsonl_texts(path)
    if name not in SOURCES:
        raise DatasetNotFoundError(
            f"unknown dataset {name!r}: use one of {', '.join(SOURCES)} or a path to a .txt/.jsonl file")
    source = SOURCES[name]
    local = data_file(source.local_file) if source.local_file else None
    if local is not None:
        return source.reader(local)
    return _load_from_hub(source)


def is_document_source(name: str) -> bool:
    source = SOURCES.get(name)
    if source is not None:
        return source.documents
    return Path(name).name.endswith((".jsonl", ".jsonl.gz"))


def joined_text(name: str) -> str:
    """The whole split joined with "\\n\\n", as the SVD-LLM perplexity protocol tokenises it."""
    return "\n\n".join(load_rows(name))
