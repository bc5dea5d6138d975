"""Calibration token windows: n samples x seqlen tokens, reproducible from a seed.

Document sources (C4, .jsonl): shuffle the document order with random.Random(seed), skip
documents shorter than seqlen tokens, and take ids[s:s+seqlen] with s = rng.randint(0, len - seqlen)
from the same rng. This is the protocol of docs/reference-figures (the reference SVD-LLM run).
Stream sources (PTB, WikiText-2): tokenise the rows joined with "\\n\\n" once, then draw random
window starts from the same kind of rng.
"""
from __future__ import annotations

import random

import torch

from .texts import is_document_source, joined_text, load_rows


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def sample_calibration(tokenizer, source: str = "c4", nsamples: int = 32, seqlen: int = 512,
                       seed: int = 0) -> torch.Tensor:
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples}, {seqlen}")
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
        raise ValueError(
            f"calibration source {source!r} yields only {len(windows)} windows of {seqlen} tokens; "
            f"asked for {nsamples}")
    return torch.tensor(windows, dtype=torch.long)
