"""Text datasets as data: each named source says where its local file is, how to read it, which
split it is, and the hub dataset to fall back on. Perplexity joins a split's rows with "\\n\\n" (the
SVD-LLM protocol); calibration draws from its documents.

The evaluation protocol (calibration text never scored)
-------------------------------------------------------
The only C4 text available offline is one file, `c4/c4_validation_2k.jsonl.gz` (2,000 documents of
C4 `en` validation, shared/data/README.md). It is split by document index, i.e. the order of the
records in the file, into three fixed, disjoint parts that cover it:

    c4-calib   documents    0 –  999   calibration                  (1,000 documents)
    c4-val     documents 1000 – 1499   validation, evaluation only  (  500 documents)
    c4-test    documents 1500 – 1999   test, evaluation only        (  500 documents)

Half the file goes to calibration because the sampler takes at most one window per document and
skips documents shorter than the window: with the SmolLM2 tokenizer the 1,000 calibration documents
give 273 windows of 512 tokens (enough for 256 x 512), 112 of 1,024 and only 32 of 2,048, so the
paper setting 256 x 2048 does not fit in this sample (use ptb-train, wikitext2-train from the hub,
or your own .jsonl). The test part is 252,706 SmolLM2 tokens (493 perplexity windows of 512), the
validation part 211,381 (412 windows). The file's order carries no known structure (the parquet's
row order: neither timestamps nor URLs are sorted, each part spans the whole 2019-04-18..26 crawl
window with similar document lengths), so contiguous ranges serve as a random split and need no seed.
The parts need the file to hold 2,000 documents (DatasetNotFoundError otherwise).

The bare name `c4` means a different part in each role, resolved by one function per role:
`calibration_source("c4")` is `c4-calib`, `evaluation_dataset("c4")` is `c4-test`. Calibration
(`sample_calibration`) and perplexity resolve names through these; `load_rows` / `joined_text` ask
for the role when given `c4`.

`c4-reference` is the whole file (every part), sampled by the walk of the authors' reference run
(docs/reference-figures: shuffle the 2,000 documents with the seed, skip short ones): it is the
only way to reproduce the reference figures (SVD-LLM on SmolLM2), and a model calibrated on it must
not be evaluated on any C4 part. As an evaluation dataset it scores the whole file, like `c4` did
before the split (figures and checkpoints from before the split that say `c4` mean the whole file).
`ptb-valid` is the PTB validation file.

Test and validation splits (`wikitext2`, `ptb`, `ptb-valid`, `c4-test`, `c4-val`) are refused as
calibration or training text by `check_training_source` (HeldOutSplitError, naming the source to use
instead) unless `allow_test_split=True`; local .txt/.jsonl files are the user's own data and are
allowed (except a path to one of the data folder's held-out files). `check_evaluation_disjoint`
refuses an evaluation whose text overlaps the calibration text (EvaluationOverlapError).
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


C4_FILE = "c4/c4_validation_2k.jsonl.gz"
C4_DOCUMENTS = 2000
C4_PARTS = {"c4-calib": (0, 1000), "c4-val": (1000, 1500), "c4-test": (1500, 2000)}  # [start, stop)
ROLES = ("calibration", "evaluation")
ROLE_ALIASES = {"c4": {"calibration": "c4-calib", "evaluation": "c4-test"}}
HELD_OUT_SPLITS = ("validation", "test")


@dataclass(frozen=True)
class TextSource:
    name: str
    local_file: str | None
    reader: Callable[[Path], list[str]] | None
    hub: tuple[str, str | None, str, str] | None  # (dataset, config, split, field)
    documents: bool  # True: rows are whole documents (sample windows inside one); False: a stream
    split: str = "train"  # train, calibration, validation, test, or all (every part of a split file)
    rows: tuple[int, int] | None = None  # [start, stop) of the file's rows (documents); None: all
    instead: str | None = None  # held-out splits: what to calibrate / train on instead

    @property
    def held_out(self) -> bool:
        return self.split in HELD_OUT_SPLITS


_C4_INSTEAD = "c4 (its calibration part, documents 0-999) or ptb-train"
SOURCES: dict[str, TextSource] = {
    "wikitext2": TextSource("wikitext2", "wikitext2/wiki.test.raw", _wikitext_rows,
                            ("wikitext", "wikitext-2-raw-v1", "test", "text"), documents=False, split="test",
                            instead="wikitext2-train (hub) or c4"),
    "wikitext2-train": TextSource("wikitext2-train", None, None,
                                  ("wikitext", "wikitext-2-raw-v1", "train", "text"), documents=False),
    "ptb": TextSource("ptb", "ptb/ptb.test.txt", _ptb_rows, ("ptb_text_only", None, "test", "sentence"),
                      documents=False, split="test", instead="ptb-train"),
    "ptb-valid": TextSource("ptb-valid", "ptb/ptb.valid.txt", _ptb_rows,
                            ("ptb_text_only", None, "validation", "sentence"), documents=False, split="validation",
                            instead="ptb-train"),
    "ptb-train": TextSource("ptb-train", "ptb/ptb.train.txt", _ptb_rows,
                            ("ptb_text_only", None, "train", "sentence"), documents=False),
    "c4-calib": TextSource("c4-calib", C4_FILE, _jsonl_texts, None, documents=True, split="calibration",
                           rows=C4_PARTS["c4-calib"]),
    "c4-val": TextSource("c4-val", C4_FILE, _jsonl_texts, None, documents=True, split="validation",
                         rows=C4_PARTS["c4-val"], instead=_C4_INSTEAD),
    "c4-test": TextSource("c4-test", C4_FILE, _jsonl_texts, None, documents=True, split="test",
                          rows=C4_PARTS["c4-test"], instead=_C4_INSTEAD),
    "c4-reference": TextSource("c4-reference", C4_FILE, _jsonl_texts, None, documents=True, split="all"),
}


class DatasetNotFoundError(FileNotFoundError):
    pass


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")


def resolve_source(name: str, role: str) -> str:
    """The source `name` reads in `role` ("calibration" or "evaluation"): `c4` is c4-calib when
    calibrating and c4-test when evaluating; every other name (and every path) is itself."""
    _check_role(role)
    return ROLE_ALIASES[name][role] if name in ROLE_ALIASES else name


def calibration_source(name: str) -> str:
    """The source a calibration (or training) run named `name` reads: `c4` -> `c4-calib`."""
    return resolve_source(name, "calibration")


def evaluation_dataset(name: str) -> str:
    """The dataset an evaluation (perplexity) named `name` scores: `c4` -> `c4-test`."""
    return resolve_source(name, "evaluation")


def _named(name: str, role: str | None) -> str:
    if name in ROLE_ALIASES:
        if role is None:
            parts = ", ".join(f"{r}: {n}" for r, n in ROLE_ALIASES[name].items())
            raise ValueError(f"{name!r} names a different part in each role ({parts}): pass role= or use the "
                             f"part's own name")
        return resolve_source(name, role)
    return name


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


def _local_path(name: str) -> Path | None:
    path = Path(name).expanduser()
    if path.suffix in (".txt", ".raw") or path.name.endswith((".jsonl", ".jsonl.gz")):
        return path if path.is_file() else None
    return None


def load_rows(name: str, role: str | None = None) -> list[str]:
    """Rows (or documents) of a named source or of a local .txt / .jsonl(.gz) file. `role`
    ("calibration" or "evaluation") is needed only for a name that means a part per role (`c4`)."""
    path = _local_path(name)
    if path is not None:
        if path.suffix in (".txt", ".raw"):
            return path.read_text(encoding="utf-8").splitlines(keepends=True)
        return _jsonl_texts(path)
    name = _named(name, role)
    if name not in SOURCES:
        raise DatasetNotFoundError(
            f"unknown dataset {name!r}: use one of {', '.join([*ROLE_ALIASES, *SOURCES])} or a path to a "
            f".txt/.jsonl file")
    source = SOURCES[name]
    local = data_file(source.local_file) if source.local_file else None
    rows = source.reader(local) if local is not None else _load_from_hub(source)
    if source.rows is None:
        return rows
    start, stop = source.rows
    if len(rows) < C4_DOCUMENTS:
        raise DatasetNotFoundError(
            f"dataset {name!r} is documents {start}-{stop - 1} of {source.local_file}, which must hold "
            f"{C4_DOCUMENTS} documents; the one in the data folder holds {len(rows)}")
    return rows[start:stop]


def is_document_source(name: str) -> bool:
    source = SOURCES.get(resolve_source(name, "calibration"))
    if source is not None:
        return source.documents
    return Path(name).name.endswith((".jsonl", ".jsonl.gz"))


def joined_text(name: str, role: str | None = None) -> str:
    """The whole split joined with "\\n\\n", as the SVD-LLM perplexity protocol tokenises it."""
    return "\n\n".join(load_rows(name, role))


# --- the protocol: held-out splits are not calibration text; evaluations score no calibration text ---

class HeldOutSplitError(ValueError):
    """A test or validation split was named as calibration or training text."""


class EvaluationOverlapError(ValueError):
    """An evaluation dataset shares text with the text the model was calibrated on."""


def _source_for_path(path: Path) -> TextSource | None:
    """The named whole-file source whose local file `path` is (e.g. a path to shared/data/ptb/ptb.test.txt)."""
    for source in SOURCES.values():
        if source.local_file is None or source.rows is not None:
            continue
        try:  # (a bad $RESSVD_DATA is not this check's business: the user's own file needs no data folder)
            local = data_file(source.local_file)
            if local is not None and local.samefile(path):
                return source
        except OSError:
            continue
    return None


def check_training_source(name: str, allow_test_split: bool = False) -> str:
    """The source a calibration or training run named `name` reads (`c4` -> `c4-calib`), after
    refusing a test or validation split (wikitext2, ptb, ptb-valid, c4-test, c4-val, or a path to the
    data folder's copy of one) with HeldOutSplitError, unless `allow_test_split` is True. Local
    .txt/.jsonl files are the user's own data and pass."""
    resolved = calibration_source(name)
    path = _local_path(resolved)
    source = _source_for_path(path) if path is not None else SOURCES.get(resolved)
    if source is not None and source.held_out and not allow_test_split:
        what = repr(resolved) if path is None else f"{str(path)!r} (the data folder's copy of {source.name!r})"
        raise HeldOutSplitError(
            f"{what} is the {source.split} split, held out for evaluation: calibrate on {source.instead} "
            f"instead (or allow it explicitly: --allow-test-calibration, allow_test_split=True)")
    return resolved


def _extent(name: str, role: str) -> tuple[str, tuple[int, int] | None]:
    """(identity of the text, [start, stop) rows or None for all) of `name` in `role`."""
    resolved = resolve_source(name, role)
    path = _local_path(resolved)
    source = _source_for_path(path) if path is not None else SOURCES.get(resolved)
    if source is None:
        return f"file:{Path(resolved).expanduser().resolve() if path is not None else resolved}", None
    # A split is the same text whether read from its local file or from the hub.
    key = f"hub:{'/'.join(str(p) for p in source.hub[:3])}" if source.hub else f"file:{source.local_file}"
    return key, source.rows


def _describe(name: str, role: str) -> str:
    resolved = resolve_source(name, role)
    source = SOURCES.get(resolved)
    alias = f"{resolved}: " if resolved != name else ""
    if source is None or source.local_file != C4_FILE:
        return repr(name) if not alias else f"{name!r} ({resolved})"
    start, stop = source.rows or (0, C4_DOCUMENTS)
    return f"{name!r} ({alias}documents {start}-{stop - 1} of {C4_FILE})"


def check_evaluation_disjoint(calibration_source: str | None, dataset: str) -> None:
    """Refuse (EvaluationOverlapError) to evaluate `dataset` on a model calibrated on
    `calibration_source` when the two share text: e.g. calibrated on c4-reference (the whole C4
    sample) and evaluated on any C4 part, or calibrated on a test split (allowed by
    allow_test_split) and evaluated on it. `c4` calibration (documents 0-999) and `c4` evaluation
    (documents 1500-1999) are disjoint. None or "tensor" (token ids passed directly): nothing to check.
    A local file is compared by its path (and is the named source whose data-folder file it is)."""
    if not calibration_source or calibration_source == "tensor":
        return
    cal_key, cal_rows = _extent(calibration_source, "calibration")
    ev_key, ev_rows = _extent(dataset, "evaluation")
    if cal_key != ev_key:
        return
    if cal_rows is not None and ev_rows is not None and (cal_rows[1] <= ev_rows[0] or ev_rows[1] <= cal_rows[0]):
        return
    on_c4 = cal_key == f"file:{C4_FILE}"
    if on_c4 and cal_rows is not None and evaluation_dataset(dataset) in ("c4-reference", "c4-calib"):
        hint = "evaluate on c4 (its test part, documents 1500-1999) or c4-val instead"
    elif on_c4:
        hint = "calibrate on c4 (documents 0-999) to evaluate on C4, or evaluate on wikitext2 or ptb"
    else:
        hint = "evaluate on a dataset disjoint from the calibration text"
    raise EvaluationOverlapError(
        f"evaluating {_describe(dataset, 'evaluation')} would score calibration text: the model was calibrated "
        f"on {_describe(calibration_source, 'calibration')}; {hint}")
