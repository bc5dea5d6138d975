"""ResSVD's partial-layer compression (PLC), methods.md §2.6.

Under an overall ratio R over decoder linears, the first N−k layers stay dense and the last k are
compressed at R_l = N·R/k each (equal layer sizes keep the overall ratio). k is feasible from
ceil(N·R/max_layer_ratio) to N; k = N is uniform compression. `k="auto"` is resolved by a search
on calibration data (ressvd.search.partial_layers) before allocation. Inside the last k layers any
other allocator can distribute the ratio (`inner`, default uniform, with `inner_options`).
"""
from __future__ import annotations

import math

from .base import (AllocationContext, AllocationResult, Allocator, Ranks, allocation_inputs, finalize, get_allocator,
                   register_allocator)
from .ranks import MatrixSpec


@register_allocator
class PartialLayerAllocation(Allocator):
    name = "partial-layer"
    summary = "ResSVD PLC: first N−k layers dense, last k at N·ratio/k (k=auto: searched on calibration data)"

    def __init__(self, k: int | str = "auto", max_layer_ratio: float = 0.95, inner: str = "uniform",
                 search_points: int = 6, max_evaluations: int = 10, holdout: float = 0.25,
                 search_samples: int = 8, criterion: str = "loss", inner_options: dict | None = None):
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
        best, curve, inputs = search_partial_layers(context.model, context.adapter, context.calib_ids, context.method,
                                                    self, context.ratio, context.options, context.matrices,
                                                    progress=context.progress, statistics=context.statistics,
                                                    weights=context.weights)
        ranks = self.ranks_for_k(context.matrices, context.ratio, context.num_layers, best, context.statistics,
                                 context.weights)
        return AllocationResult(ranks, resolved_options={"k": best},
                                search={"k": best, "criterion": self.criterion, "curve": [p.to_dict() for p in curve]},
                                details=dict(self.diagnostics) or None, start_inputs=inputs)

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
