"""Calibration token windows: n samples x seqlen tokens, reproducible from a seed.

The source is resolved in the calibration role and checked first (texts.check_training_source):
`c4` is the calibration part of the C4 sample (documents 0-999), and test / validation splits
(wikitext2, ptb, ptb-valid, c4-test, c4-val) are refused unless allow_test_split=True.

Document sources (C4 parts, .jsonl): shuffle the order of the source's documents with
random.Random(seed), skip documents shorter than seqlen tokens, and take ids[s:s+seqlen] with
s = rng.randint(0, len - seqlen) from the same rng. This is the protocol of docs/reference-figures
(the reference SVD-LLM run); over `c4-reference` (all 2,000 documents) it draws the reference run's
windows exactly. Over `c4` it walks the 1,000 calibration documents, so the same seed draws other
windows than before the split; the SmolLM2 tokenizer gets at most 273 windows of 512 tokens there
(32 of 2,048).
Stream sources (PTB, WikiText-2): tokenise the rows joined with "\\n\\n" once, then draw random
window starts from the same kind of rng.
"""
from __future__ import annotations

import random

import torch

from .texts import check_training_source, is_document_source, joined_text, load_rows


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def sample_calibration(tokenizer, source: str = "c4", nsamples: int = 32, seqlen: int = 512,
                       seed: int = 0, *, allow_test_split: bool = False) -> torch.Tensor:
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples}, {seqlen}")
    named, source = source, check_training_source(source, allow_test_split)
    rng = random.Random(seed)
    windows: list[list[int]] = []
    if is_document_source(source):
        documents = load_rows(source)
        order = list(range(len(documents)))
        rng.shuffle(order)
        for index in order:
            ids = _tokenize(tokenizer, documents[index])
            if len(ids) < seqlen:
                continue
            start = rng.randint(0, len(ids) - seqlen)
            windows.append(ids[start:start + seqlen])
            if len(windows) == nsamples:
                break
    else:
        ids = _tokenize(tokenizer, joined_text(source))
        if len(ids) >= seqlen:
            for _ in range(nsamples):
                start = rng.randint(0, len(ids) - seqlen)
                windows.append(ids[start:start + seqlen])
    if len(windows) < nsamples:
        label = repr(named) if named == source else f"{named!r} ({source})"
        each = " (one per document of at least that length)" if is_document_source(source) else ""
        raise ValueError(
            f"calibration source {label} yields only {len(windows)} windows of {seqlen} tokens{each}; "
            f"asked for {nsamples}")
    return torch.tensor(windows, dtype=torch.long)
