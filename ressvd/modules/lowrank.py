"""The low-rank replacement for nn.Linear: y = A(Bx), r(m+n) parameters."""
from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """Two stacked linears: B (in -> rank, no bias) then A (rank -> out, keeps the bias).

    State-dict keys are `<name>.B.weight`, `<name>.A.weight` and `<name>.A.bias`, so a
    checkpoint names its factors the way the method papers write them (W ~ A B).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.A = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype, device=None) -> "LowRankLinear":
        out_features, rank = A.shape
        rank_b, in_features = B.shape
        if rank != rank_b:
            raise ValueError(f"factor ranks differ: A {tuple(A.shape)}, B {tuple(B.shape)}")
        layer = cls(in_features, out_features, rank, bias=bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            layer.A.weight.copy_(A.to(dtype))
            layer.B.weight.copy_(B.to(dtype))
            if bias is not None:
                layer.A.bias.copy_(bias.to(dtype))
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dense product A·B (for inspection and tests; forward never forms it)."""
        return self.A.weight @ self.B.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
