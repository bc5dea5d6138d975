"""SVD-LLM V2 heterogeneous allocation (methods.md §2.5, Algorithm 1).

1. Group the matrices by type (q, k, v, o, gate, up, down).
2. For each matrix w, its theoretical truncation loss at the target ratio R:
   L_w = (Σ_{j>r} σ_j(W·S)²)^½, r = ⌊(1−R)·mn/(m+n)⌋, S Sᵀ = H the dense Gram (a sum over tokens;
   eigen square root, so singular Grams are fine).
3. Within a group G: R_w = |G|·R·(1/log L_w) / Σ_{w′∈G} 1/log L_{w′}.
   High-loss matrices get a lower ratio; the group mean stays R.

Choices the paper leaves open (recorded in `diagnostics`):
* log L ≤ 0 (L ≤ 1, e.g. a per-token-normalised Gram): 1/log L is meaningless, so that group
  falls back to the uniform ratio R and is listed in `guarded_groups`.
* Feasible range: R_w is clamped to [min_ratio, max_ratio_w], max_ratio_w = min(max_ratio,
  1 − (m+n)/mn) (at least rank 1). Clamping breaks the group mean, so each group is re-normalised:
  R_w = clamp(c_G·R_w^raw) with the scale c_G found by bisection so that the group removes exactly
  R·Σ_G mn parameters; unclamped matrices keep their 1/log L proportions.
* Scale: H is a sum over this run's calibration tokens, and log(c·L) = log c + log L, so the
  ratios depend on how many tokens were summed. `loss_tokens` rescales every H to a fixed token
  count first (the paper calibrates on 256 × 2048 = 524288 tokens); the default keeps the raw sum.
* Integer ranks: r_w = ⌊(1−R_w)·mn/(m+n)⌋, then one extra rank goes to the matrices with the
  largest rounding remainders while the budget allows, so the parameters removed exceed R·Σ mn by
  less than one rank of one matrix (never fewer removed than the target).

`allocate_v2` works on any subset of the matrices at any ratio (a partial-layer allocator calls it
on the last k layers at N·R/k) and returns ranks for that subset only.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Callable, Iterator

import torch

from ..methods.linalg import eigen_whitening
from .base import Allocator, Ranks, finalize, register_allocator
from .ranks import MatrixSpec, factorization_saves, rank_for_ratio, validate_ratio

log = logging.getLogger("ressvd")

WeightFn = Callable[[str], torch.Tensor]


def whitened_spectra(matrices: list[MatrixSpec], statistics: Callable[[], Iterator], weights: WeightFn,
                     eig_floor: float = 1e-10, passed_too: bool = False) -> dict[str, tuple[torch.Tensor, int]]:
    """σ(W·S) of each matrix in `matrices` (S Sᵀ = H, the dense Gram) and the number of tokens
    summed into H. The statistics are consumed layer by layer, stopping once every wanted matrix is
    seen; `passed_too` also keeps the spectra of the other matrices streamed through on the way.
    The spectrum does not depend on the ratio, so callers that try several ratios and subsets (the
    partial-layer search) compute it once."""
    wanted = {m.name: m for m in matrices}
    spectra: dict[str, tuple[torch.Tensor, int]] = {}
    stream = statistics()
    try:
        for _index, layer_stats in stream:
            for name, group in layer_stats.items():
                if name not in wanted and not passed_too:
                    continue
                whitening = group.cached(f"eigen:{eig_floor}", lambda g=group: eigen_whitening(g.primary.gram,
                                                                                               eig_floor))
                W = weights(name).detach().to(device=whitening.U.device, dtype=torch.float64)
                spectra[name] = (torch.linalg.svdvals(W @ whitening.S).cpu(), group.primary.tokens)
            if wanted.keys() <= spectra.keys():
                break
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    missing = sorted(wanted.keys() - spectra.keys())
    if missing:
        raise ValueError(f"no statistics for {len(missing)} matrices, e.g. {missing[0]!r}")
    return spectra


def losses_from_spectra(matrices: list[MatrixSpec], ratio: float, spectra: dict[str, tuple[torch.Tensor, int]],
                        loss_tokens: int | None = None) -> dict[str, float]:
    """L_w = (Σ_{j>r} σ_j²)^½ at the uniform rank of `ratio`. With `loss_tokens`, each H is first
    rescaled to that many tokens (L ∝ √tokens): log L, and so the allocation, depends on the Gram's
    scale, which the paper leaves at its own 256 × 2048 calibration tokens."""
    losses = {}
    for spec in matrices:
        sigma, tokens = spectra[spec.name]
        r = rank_for_ratio(spec.out_features, spec.in_features, ratio)
        scale = math.sqrt(loss_tokens / tokens) if loss_tokens else 1.0
        losses[spec.name] = scale * float(sigma[r:].pow(2).sum().sqrt())
    return losses


def truncation_losses(matrices: list[MatrixSpec], ratio: float, statistics: Callable[[], Iterator],
                      weights: WeightFn, eig_floor: float = 1e-10, loss_tokens: int | None = None) -> dict[str, float]:
    """L_w at the uniform rank of `ratio`, for each matrix in `matrices`, from the dense statistics."""
    return losses_from_spectra(matrices, ratio, whitened_spectra(matrices, statistics, weights, eig_floor),
                               loss_tokens)


def _max_ratio(spec: MatrixSpec, max_ratio: float) -> float:
    return min(max_ratio, 1 - (spec.out_features + spec.in_features) / spec.dense_params)


def ratios_from_losses(matrices: list[MatrixSpec], ratio: float, losses: dict[str, float], min_ratio: float = 0.0,
                       max_ratio: float = 1.0) -> tuple[dict[str, float], dict]:
    """Per-matrix ratios (continuous) by 1/log L within each type group, clamped and re-normalised
    so that each group removes exactly `ratio` of its parameters."""
    groups: dict[str, list[MatrixSpec]] = defaultdict(list)
    for spec in matrices:
        groups[spec.kind].append(spec)
    ratios: dict[str, float] = {}
    diagnostics = {"guarded_groups": [], "scale": {}, "clamped": 0}
    for kind, specs in groups.items():
        lo = {s.name: min_ratio for s in specs}
        hi = {s.name: _max_ratio(s, max_ratio) for s in specs}
        params = {s.name: s.dense_params for s in specs}
        target = ratio * sum(params.values())
        if sum(lo[n] * params[n] for n in params) > target + 1e-9 * target or \
                sum(hi[n] * params[n] for n in params) < target - 1e-9 * target:
            raise ValueError(f"v2 allocation: ratio {ratio} is outside the feasible range "
                             f"[{min_ratio}, max_ratio] of the {kind} matrices")
        logs = {s.name: math.log(losses[s.name]) if losses[s.name] > 0 else -math.inf for s in specs}
        if any(value <= 0 for value in logs.values()):
            log.warning("v2 allocation: log L <= 0 for some %s matrix (L <= 1); that group gets the uniform ratio",
                        kind)
            diagnostics["guarded_groups"].append(kind)
            raw = {n: ratio for n in params}
        else:
            inverse = {n: 1 / value for n, value in logs.items()}
            total = sum(inverse.values())
            raw = {n: len(specs) * ratio * inverse[n] / total for n in params}

        def removed(c: float) -> float:
            return sum(min(max(c * raw[n], lo[n]), hi[n]) * params[n] for n in params)

        low_c, high_c = 0.0, 1.0
        while removed(high_c) < target:
            high_c *= 2
            if high_c > 1e12:
                raise ValueError(f"v2 allocation: cannot meet ratio {ratio} for the {kind} matrices")
        for _ in range(200):
            mid = (low_c + high_c) / 2
            if removed(mid) < target:
                low_c = mid
            else:
                high_c = mid
        c = high_c
        diagnostics["scale"][kind] = c
        for n in params:
            value = c * raw[n]
            clamped = min(max(value, lo[n]), hi[n])
            diagnostics["clamped"] += int(clamped != value)
            ratios[n] = clamped
    return ratios, diagnostics


def ranks_from_ratios(matrices: list[MatrixSpec], ratios: dict[str, float], ratio: float) -> Ranks:
    """Integer ranks for per-matrix ratios, topped up so the subset meets `ratio` to within one rank."""
    ranks: dict[str, int] = {}
    remainder: dict[str, float] = {}
    for spec in matrices:
        exact = (1 - ratios[spec.name]) * spec.dense_params / (spec.out_features + spec.in_features)
        ranks[spec.name] = max(math.floor(exact + 1e-9), 0)
        remainder[spec.name] = exact - ranks[spec.name]
    budget = (1 - ratio) * sum(s.dense_params for s in matrices)  # parameters that may be kept
    kept = sum(s.params_at(ranks[s.name]) for s in matrices)
    for spec in sorted(matrices, key=lambda s: -remainder[s.name]):
        r = ranks[spec.name]
        if not factorization_saves(r + 1, spec.out_features, spec.in_features):
            continue
        cost = spec.params_at(r + 1) - spec.params_at(r)
        if kept + cost <= budget + 1e-9:
            ranks[spec.name] = r + 1
            kept += cost
    return {name: (r if r >= 1 else None) for name, r in ranks.items()}


def allocate_v2(matrices: list[MatrixSpec], ratio: float, statistics: Callable[[], Iterator] | None = None,
                weights: WeightFn | None = None, min_ratio: float = 0.0, max_ratio: float = 1.0,
                eig_floor: float = 1e-10, loss_tokens: int | None = None,
                spectra: dict | None = None) -> tuple[Ranks, dict]:
    """V2 ranks for `matrices` (any subset) at `ratio`; returns (ranks, diagnostics). `spectra`
    (from `whitened_spectra`) replaces `statistics` and `weights`."""
    if spectra is None:
        if statistics is None or weights is None:
            raise ValueError("allocate_v2 needs the spectra, or the statistics and the weights")
        spectra = whitened_spectra(matrices, statistics, weights, eig_floor)
    losses = losses_from_spectra(matrices, ratio, spectra, loss_tokens)
    ratios, diagnostics = ratios_from_losses(matrices, ratio, losses, min_ratio, max_ratio)
    ranks = finalize(matrices, ranks_from_ratios(matrices, ratios, ratio))
    diagnostics.update(losses=losses, ratios=ratios)
    return ranks, diagnostics


@register_allocator
class V2Allocation(Allocator):
    name = "v2"
    summary = ("SVD-LLM V2: per-type groups, ratio ∝ 1/log(truncation loss at the target ratio), "
               "clamped and re-normalised to the exact budget")
    needs_statistics = True

    def __init__(self, min_ratio: float = 0.0, max_ratio: float = 1.0, eig_floor: float = 1e-10,
                 loss_tokens: int | None = None):
        self.min_ratio, self.max_ratio, self.eig_floor = float(min_ratio), float(max_ratio), float(eig_floor)
        if not 0 <= self.min_ratio < self.max_ratio <= 1:
            raise ValueError(f"need 0 <= min_ratio < max_ratio <= 1, got {min_ratio}, {max_ratio}")
        if loss_tokens is not None and (not isinstance(loss_tokens, int) or loss_tokens < 1):
            raise ValueError(f"loss_tokens must be a positive integer (e.g. 524288 = 256 x 2048), got {loss_tokens!r}")
        self.loss_tokens = loss_tokens
        self.diagnostics: dict = {}
        # Spectra per matrix name, reused while allocate() gets the same statistics and weights
        # (the partial-layer search asks for many suffixes and ratios of one model).
        self._spectra: dict[str, tuple[torch.Tensor, int]] = {}
        self._spectra_source: tuple | None = None

    def allocate(self, matrices: list[MatrixSpec], ratio: float, num_layers: int, statistics=None,
                 weights: WeightFn | None = None) -> Ranks:
        ratio = validate_ratio(ratio)
        if statistics is None or weights is None:
            raise ValueError("the v2 allocation needs the dense statistics and the weights: "
                             "allocate(..., statistics=..., weights=name -> tensor)")
        if self._spectra_source != (statistics, weights):
            self._spectra, self._spectra_source = {}, (statistics, weights)
        missing = [m for m in matrices if m.name not in self._spectra]
        if missing:  # one pass: keep every matrix streamed through, later calls may want them
            self._spectra.update(whitened_spectra(missing, statistics, weights, self.eig_floor, passed_too=True))
        ranks, self.diagnostics = allocate_v2(matrices, ratio, min_ratio=self.min_ratio, max_ratio=self.max_ratio,
                                              loss_tokens=self.loss_tokens, spectra=self._spectra)
        return ranks
