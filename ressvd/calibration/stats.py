"""Statistics of one linear input, accumulated token by token.

One `InputStats` per distinct input (q/k/v share one, gate/up share one). Sums, not means: the
Gram matrix H = sum_t x_t x_t^T (methods.md §1.5 records that V2's log-loss allocation is not
scale invariant, so this choice is part of the spec).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class InputStats:
    """Sums over calibration tokens of one input x (n features)."""

    gram: torch.Tensor  # (n, n) sum x x^T
    abs_sum: torch.Tensor  # (n,) sum |x|, for ASVD
    tokens: int = 0

    @classmethod
    def zeros(cls, n: int, dtype: torch.dtype, device) -> "InputStats":
        return cls(torch.zeros(n, n, dtype=dtype, device=device), torch.zeros(n, dtype=dtype, device=device))

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.gram.dtype)
        self.gram.addmm_(x.T, x)
        self.abs_sum.add_(x.abs().sum(0))
        self.tokens += x.shape[0]


@dataclass
class GroupStats:
    """Everything a method may ask about one distinct input.

    `primary` is the stream the run's `stats` option chose (dense model or compressed prefix);
    `dense` and `compressed` are present when a method asked for both, and `cross` = sum x x~^T
    (dense input times compressed-prefix input, token by token) when it asked for the cross term.
    """

    primary: InputStats
    dense: InputStats | None = None
    compressed: InputStats | None = None
    cross: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # method-specific sums (e.g. Fisher)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """Share one factorisation (e.g. the Cholesky factor) among the linears of a group."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]
