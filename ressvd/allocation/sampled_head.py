"""The sensitivity probes' LM head over part of the vocabulary (option score_vocab of the sensitivity
allocation).

Why: every scored probe runs the LM head over the held-out tokens, and on a large vocabulary that
product is most of a suffix pass (Gemma-3's 262k rows: about 2.3 s of a 3.0 s dense scoring pass on
a CPU). The mean NLL needs, per position, the target's logit and log Z = logsumexp over the whole
vocabulary. The target's logit needs one row; log Z is dominated by the few tokens that carry the
probability mass. So the head is evaluated on
- a "head" set of `size // 2` rows (more if the targets need them): every held-out target token
  (so the target's logit is exact), then the tokens with the most dense-model probability mass
  summed over the held-out positions;
- a "tail" sample: the rest of `size` drawn uniformly (fixed seed) from the other tokens, each
  standing for (other tokens)/(sampled) of them, an unbiased estimate of the tail's Σ exp(z).
log Z ≈ logsumexp(z_head ∪ z_tail + log w), w = 1 on the head set. The dense baseline and every probe
use the same estimator and the same sample, so its error largely cancels in Δ = L(probe) − L(dense),
which is all the allocation reads. docs/BENCHMARKS.md (issue 16, session 13) measures the Δs and the
allocation it gives against the exact head.
"""
from __future__ import annotations

import math

import torch

# the tail sample's seed: the estimator must be the same for the baseline and every probe
TAIL_SEED = 0


def _softcapped(model, logits: torch.Tensor) -> torch.Tensor:
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits  # as the model's forward applies it


class SampledHead:
    """`nll(normed, ids)`: the mean next-token NLL of the LM head estimated on `size` vocabulary rows
    (module docstring), chosen once from the dense model's final normed states `dense_normed` on
    the held-out `ids`."""

    def __init__(self, model, dense_normed: list[torch.Tensor], ids: torch.Tensor, size: int):
        head = model.get_output_embeddings()
        vocab = head.weight.shape[0]
        if size > vocab:
            raise ValueError(f"score_vocab {size} exceeds the vocabulary ({vocab}): score the full head")
        device = head.weight.device
        mass = torch.zeros(vocab, dtype=torch.float64, device=device)
        with torch.no_grad():
            for chunk in dense_normed:
                for hidden in chunk:
                    logits = _softcapped(model, head(hidden.to(device, head.weight.dtype)).float())
                    mass += torch.softmax(logits[:-1], dim=-1).sum(0).double()
        keep = torch.zeros(vocab, dtype=torch.bool, device=device)
        keep[ids[:, 1:].reshape(-1).to(device)] = True  # every target's logit is exact
        if int(keep.sum()) > size:
            raise ValueError(f"score_vocab {size} is smaller than the {int(keep.sum())} distinct held-out targets: "
                             f"raise it (or score_vocab=full)")
        top = torch.argsort(mass, descending=True)
        need = max(size // 2 - int(keep.sum()), 0)
        keep[top[~keep[top]][:need]] = True
        rest = torch.nonzero(~keep).flatten()
        tail_size = min(size - int(keep.sum()), rest.numel())
        if tail_size < 1 and rest.numel():
            raise ValueError(f"score_vocab {size} leaves no room for the tail sample next to the "
                             f"{int(keep.sum())} held-out targets and top tokens: raise it")
        generator = torch.Generator().manual_seed(TAIL_SEED)
        tail = rest[torch.randperm(rest.numel(), generator=generator)[:tail_size].to(device)]
        self.rows = torch.cat([torch.nonzero(keep).flatten(), tail])
        self.log_weights = torch.cat([torch.zeros(int(keep.sum()), device=device),
                                      torch.full((tail_size,), math.log(rest.numel() / max(tail_size, 1)),
                                                 device=device)])
        position = torch.full((vocab,), -1, dtype=torch.long, device=device)
        position[self.rows] = torch.arange(self.rows.numel(), device=device)
        self._position = position  # vocabulary id -> column of the sub-head
        self.weight = head.weight[self.rows].detach()
        self.bias = head.bias[self.rows].detach() if getattr(head, "bias", None) is not None else None
        self._model = model
        self.head_mass = float(mass[keep].sum() / mass.sum())  # the dense mass the head set holds

    @torch.no_grad()
    def nll(self, normed: list[torch.Tensor], ids: torch.Tensor) -> float:
        total, count, row = 0.0, 0, 0
        for chunk in normed:
            for hidden in chunk:
                logits = torch.nn.functional.linear(hidden.to(self.weight.device, self.weight.dtype), self.weight,
                                                    self.bias).float()
                logits = _softcapped(self._model, logits)[:-1]
                columns = self._position[ids[row, 1:].to(self.weight.device)]
                if bool((columns < 0).any()):
                    raise ValueError("SampledHead.nll: a target outside the rows chosen; score the ids it was built on")
                log_z = torch.logsumexp(logits + self.log_weights, dim=-1)
                total += float((log_z - logits.gather(1, columns[:, None])[:, 0]).sum())
                count += columns.numel()
                row += 1
        return total / count
