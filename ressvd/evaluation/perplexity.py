"""Perplexity by the SVD-LLM protocol: the split's rows joined with "\\n\\n", tokenised once, cut into
non-overlapping windows of `seqlen` (remainder dropped); PPL = exp(mean NLL over all predicted
tokens of all windows). Non-finite logits are an error, never silently dropped.

Dataset names are resolved in the evaluation role (ressvd.data.evaluation_dataset): `c4` scores
the test part of the local C4 sample, documents 1500-1999 (`c4-test`), never the calibration part
(documents 0-999) that `c4` calibration draws from; `c4-val` is documents 1000-1499, `c4-reference`
the whole 2,000-document file (the figures from before the split; it contains the calibration
part). `wikitext2` and `ptb` are the test splits, `ptb-valid` the PTB validation split. Whether an
evaluation scores its model's calibration text is checked by ressvd.data.check_evaluation_disjoint
(the CLI calls it); this module scores what it is given."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.texts import evaluation_dataset, joined_text


class NonFiniteLogitsError(RuntimeError):
    pass


@dataclass
class PerplexityResult:
    dataset: str
    ppl: float
    mean_nll: float
    windows: int
    predicted_tokens: int
    seqlen: int


def token_windows(tokenizer, dataset: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    ids = torch.tensor(tokenizer(joined_text(evaluation_dataset(dataset)))["input_ids"], dtype=torch.long)
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"{dataset} has fewer than {seqlen} tokens")
    return ids[: count * seqlen].view(count, seqlen)


@torch.no_grad()
def perplexity(model, tokenizer, dataset: str = "wikitext2", seqlen: int = 512, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    windows = token_windows(tokenizer, dataset, seqlen, max_windows)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=f"ppl {dataset}", disable=not progress, unit="batch"):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        if not torch.isfinite(logits).all():
            raise NonFiniteLogitsError(f"non-finite logits while evaluating {dataset}")
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return PerplexityResult(dataset, math.exp(mean), mean, windows.shape[0], total_tokens, seqlen)
