"""The ratio convention, in one place.

ratio = fraction of decoder-linear weight parameters removed; rank = floor((1 - ratio)·mn/(m+n)).
Computed in exact rational arithmetic so that, e.g., 0.8·288 = 230.4 never rounds to 230.39999.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction


def validate_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not (0.0 < ratio < 1.0) or math.isnan(ratio):
        raise ValueError(f"ratio must lie strictly between 0 and 1 (fraction of decoder-linear "
                         f"parameters removed), got {ratio}")
    return ratio


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    kept = 1 - Fraction(repr(float(ratio)))
    return math.floor(kept * out_features * in_features / (out_features + in_features))


def factorization_saves(rank: int | None, out_features: int, in_features: int) -> bool:
    """A rank-r factorisation is worth storing only when r >= 1 and r(m+n) < mn."""
    return rank is not None and rank >= 1 and rank * (out_features + in_features) < out_features * in_features


@dataclass(frozen=True)
class MatrixSpec:
    """One decoder linear as allocation sees it."""

    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    layer: int
    linear: str  # name inside the layer, e.g. "self_attn.q_proj"
    kind: str  # matrix type for per-type groups, e.g. "q_proj"
    out_features: int
    in_features: int

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def params_at(self, rank: int | None) -> int:
        if not factorization_saves(rank, self.out_features, self.in_features):
            return self.dense_params
        return rank * (self.out_features + self.in_features)
