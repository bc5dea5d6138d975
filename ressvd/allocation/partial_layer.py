"""ResSVD's partial-layer compression (PLC), methods.md §2.6.

Under an overall ratio R over decoder linears, the first N−k layers stay dense and the last k are
compressed at R_l = N·R/k each (equal layer sizes keep the overall ratio). k is feasible from
ceil(N·R/max_layer_ratio) to N; k = N is uniform compression. `k="auto"` is resolved by a search
on calibration data (ressvd.search.partial_layers) before allocation. Inside the last k layers any
other allocator can distribute the ratio (`inner`, default uniform, with `inner_options`).

Two searches (`search`):
- "grid" (default): every candidate k compresses a whole suffix and is scored on held-out
  sequences (ressvd.search.partial_layers): a coarse grid, then midpoints around the best.
- "predicted": one per-layer sensitivity profile (the probes of `--allocation sensitivity`, with
  `sensitivity_options`) predicts each k's held-out loss as base + Σ over the last k layers of
  Δ_l(N·R/k), and k̂ is its minimiser; then the `refine` nearest feasible ks on each side of k̂ and
  k̂ itself are evaluated as the grid search evaluates them, and the best of those is kept
  (refine=0: k̂ unevaluated). It pays one profile (one decomposition per matrix with SVD-LLM's
  spectrum) instead of up to `max_evaluations` suffix compressions. Its profile keeps the probes
  it was measured with (PREDICTED_PROFILE: candidates 0.2/0.4/0.6/0.8, every one scored), not the
  sensitivity allocation's cheaper default: k̂ reads Δ at N·R/k, which extrapolated scores move
  (on the 8-layer test model they moved k̂ off the grid search's k).
"""
from __future__ import annotations

import math

from .base import (AllocationContext, AllocationResult, Allocator, Ranks, allocation_inputs, finalize, get_allocator,
                   register_allocator)
from .ranks import MatrixSpec
from .sensitivity import interpolate

SEARCHES = ("grid", "predicted")


# The predicted search's profile defaults (module docstring), under any sensitivity_options given:
# the probes it was measured with (sessions 10-12), the exact LM head included
PREDICTED_PROFILE = {"ratios": (0.2, 0.4, 0.6, 0.8), "scored": "all", "score_vocab": "full"}


def predicted_losses(sensitivity: dict[str, dict[str, float]], num_layers: int, ratio: float,
                     ks: list[int]) -> dict[int, float]:
    """Σ Δ_l(N·R/k) over the last k layers for each k, from a per-layer sensitivity profile
    (ressvd.allocation.sensitivity: Δ interpolated between its measured ratios); inf where N·R/k
    lies above the largest measured ratio or a Δ there is not finite."""
    top = min(max(float(c) for c in row) for row in sensitivity.values())
    predicted = {}
    for k in ks:
        layer_ratio = num_layers * ratio / k
        predicted[k] = math.inf if layer_ratio > top + 1e-12 else \
            sum(interpolate(sensitivity[str(l)], layer_ratio) for l in range(num_layers - k, num_layers))
    return predicted


@register_allocator
class PartialLayerAllocation(Allocator):
    name = "partial-layer"
    summary = "ResSVD PLC: first N−k layers dense, last k at N·ratio/k (k=auto: searched on calibration data)"

    def __init__(self, k: int | str = "auto", max_layer_ratio: float = 0.95, inner: str = "uniform",
                 search_points: int = 6, max_evaluations: int = 10, holdout: float = 0.25,
                 search_samples: int = 8, criterion: str = "loss", inner_options: dict | None = None,
                 search: str = "grid", refine: int = 1, sensitivity_options: dict | None = None):
        if k != "auto" and (not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive integer or 'auto', got {k!r}")
        if not 0 < max_layer_ratio < 1:
            raise ValueError(f"max_layer_ratio must lie in (0, 1), got {max_layer_ratio}")
        self.k, self.max_layer_ratio, self.inner_name = k, max_layer_ratio, inner
        # The search fits each candidate on at most `search_samples` sequences and scores it on the
        # held-out `holdout` fraction; the final compression with the chosen k uses every sequence.
        self.search_points, self.max_evaluations, self.holdout = search_points, max_evaluations, holdout
        self.search_samples = search_samples
        if criterion not in ("loss", "hidden"):
            raise ValueError(f"criterion must be 'loss' (held-out next-token NLL) or 'hidden' (final hidden-state "
                             f"error), got {criterion!r}")
        self.criterion = criterion
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
        if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
            raise ValueError(f"refine must be a non-negative integer, got {refine!r}")
        self.search, self.refine = search, refine
        self.sensitivity_options = {**PREDICTED_PROFILE, **(sensitivity_options or {})}
        if search == "predicted":
            if self.sensitivity_options.get("groups"):
                raise ValueError("the predicted k search reads a per-layer profile: sensitivity option groups "
                                 "must stay false")
            get_allocator("sensitivity", **self.sensitivity_options)  # bad options fail here, not mid-run
        self.inner_options = dict(inner_options or {})
        self.inner = get_allocator(inner, **self.inner_options)
        self.needs_statistics = self.inner.needs_statistics

    @property
    def diagnostics(self) -> dict:
        return self.inner.diagnostics

    @property
    def needs_search(self) -> bool:
        return self.k == "auto"

    @property
    def whole_model_reason(self) -> str | None:
        return "the partial-layer k search runs the whole model" if self.needs_search else self.inner.whole_model_reason

    @property
    def profile_reason(self) -> str | None:
        # each candidate is fitted on a subset of the calibration set, which no profile holds
        return "the partial-layer k search fits candidates on subsets of the calibration set" \
            if self.needs_search else self.inner.profile_reason

    def resolve(self, context: AllocationContext) -> AllocationResult:
        """With k="auto", search k on calibration data (ressvd.search.partial_layers) and return the
        chosen k with the ranks; the allocator itself is not changed."""
        if not self.needs_search:
            return super().resolve(context)
        from ..search import search_partial_layers
        record, candidates, inputs, curve = {"search": self.search}, None, None, []
        if self.search == "predicted":
            feasible = self.feasible_ks(context.num_layers, context.ratio)
            profile = get_allocator("sensitivity", **self.sensitivity_options)
            base, sensitivity, probes = profile.measure(context, context.ratio)
            deltas = predicted_losses(sensitivity, context.num_layers, context.ratio, feasible)
            predicted = min(deltas, key=lambda k: (deltas[k], -k))  # ties: the more layers, the milder each
            position = feasible.index(predicted)
            candidates = feasible[max(0, position - self.refine): position + self.refine + 1]
            record.update(predicted_k=predicted, probes=probes,
                          predicted={str(k): base + d for k, d in deltas.items()})
        if candidates is None or self.refine > 0:
            best, curve, inputs = search_partial_layers(context.model, context.adapter, context.calib_ids,
                                                        context.method, self, context.ratio, context.options,
                                                        context.matrices, progress=context.progress,
                                                        statistics=context.statistics, weights=context.weights,
                                                        candidates=candidates)
        else:
            best = candidates[0]
        ranks = self.ranks_for_k(context.matrices, context.ratio, context.num_layers, best, context.statistics,
                                 context.weights)
        record.update(k=best, criterion=self.criterion, curve=[p.to_dict() for p in curve])
        details = dict(self.diagnostics)
        if self.search == "predicted":  # the profile, with PLC's layer ratios, for `ressvd report`'s heatmap
            layer_ratio = self.layer_ratio(context.num_layers, context.ratio, best)
            details.update(sensitivity=sensitivity, base_loss=base, units="layers",
                           ratios={u: layer_ratio if int(u) >= context.num_layers - best else 0.0
                                   for u in sensitivity})
        return AllocationResult(ranks, resolved_options={"k": best}, search=record, details=details or None,
                                start_inputs=inputs)

    def feasible_ks(self, num_layers: int, ratio: float) -> list[int]:
        k_min = max(1, math.ceil(num_layers * ratio / self.max_layer_ratio - 1e-9))
        return list(range(k_min, num_layers + 1))

    def layer_ratio(self, num_layers: int, ratio: float, k: int) -> float:
        return num_layers * ratio / k

    def ranks_for_k(self, matrices: list[MatrixSpec], ratio: float, num_layers: int, k: int,
                    statistics=None, weights=None) -> Ranks:
        feasible = self.feasible_ks(num_layers, ratio)
        if k not in feasible:
            raise ValueError(f"k={k} is infeasible at ratio {ratio} with {num_layers} layers: each compressed "
                             f"layer may lose at most {self.max_layer_ratio} of its parameters, so k must lie in "
                             f"[{feasible[0]}, {num_layers}]")
        suffix = [m for m in matrices if m.layer >= num_layers - k]
        ranks = self.inner.allocate(suffix, self.layer_ratio(num_layers, ratio, k), num_layers,
                                    **allocation_inputs(self.inner, statistics, weights))
        return finalize(matrices, ranks)

    def allocate(self, matrices: list[MatrixSpec], ratio: float, num_layers: int, statistics=None,
                 weights=None) -> Ranks:
        if self.k == "auto":
            raise RuntimeError("k='auto' must be resolved by ressvd.search.partial_layers before allocation")
        return self.ranks_for_k(matrices, ratio, num_layers, self.k, statistics, weights)
