"""Training token windows for healing, drawn from a training source only.

`training_windows` refuses test and validation splits through the data layer's own check
(ressvd.data.check_training_source: `c4` means its calibration part c4-calib, `wikitext2`, `ptb`,
`ptb-valid`, `c4-test` and `c4-val` raise HeldOutSplitError), then draws with the calibration
sampler (ressvd.data.sample_calibration), so a seed gives the same windows the same way calibration
does. That sampler takes at most one window per document of a document source; when a heal needs
more windows than a document source has documents of `seqlen` tokens (C4's calibration part gives
~270 windows of 512 SmolLM2 tokens, ~1,000 of 256), the documents are joined with "\\n\\n" and the
windows are drawn as from a stream source (random starts from random.Random(seed)), which reuses
text across windows rather than failing.
"""
from __future__ import annotations

import random

import torch


def training_windows(tokenizer, source: str = "c4", nsamples: int = 256, seqlen: int = 512, seed: int = 0, *,
                     allow_test_split: bool = False) -> torch.LongTensor:
    """`nsamples` windows of `seqlen` token ids [nsamples, seqlen] from the training source `source`
    (a named training split, or a local .txt / .jsonl file)."""
    from ..data import check_training_source, sample_calibration
    from ..data.texts import is_document_source, joined_text

    resolved = check_training_source(source, allow_test_split)  # HeldOutSplitError for test / validation splits
    try:
        return sample_calibration(tokenizer, resolved, nsamples, seqlen, seed, allow_test_split=allow_test_split)
    except ValueError as err:
        if not is_document_source(resolved) or "yields only" not in str(err):
            raise
    ids = tokenizer(joined_text(resolved))["input_ids"]
    if len(ids) < seqlen:
        raise ValueError(f"training source {source!r} has {len(ids)} tokens, fewer than one window of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen) for _ in range(nsamples)]
    return torch.tensor([ids[s:s + seqlen] for s in starts], dtype=torch.long)
