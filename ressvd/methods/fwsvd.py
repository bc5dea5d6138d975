"""FWSVD, Fisher-weighted SVD (methods.md §2.2).

prepare() runs the LM loss over the calibration sequences (`batch_size` sequences per backward,
default one) and averages the squared gradients of every decoder-linear weight over the backward
passes: F_ij = mean_b (∂ℓ_b/∂W_ij)². Only the two reductions are kept: row sums d_i = Σ_j F_ij
and column sums c_j = Σ_i F_ij.

axis="rows" (default, the FWSVD paper): D = diag(d^α), W′ = D⁻¹ trunc_r(D·W), which minimises
||D(W − W′)||_F. axis="columns" (the LLM baseline of the ASVD4LLM code, which averages squared
gradients over rows and weights input columns): S = diag(c^α), W′ = trunc_r(W·S)·S⁻¹. α = 0.5 gives
the √I of the paper. The axis is recorded in each module's info. Zero importances are floored at
`floor`·max. Later papers do not say which axis their FWSVD baseline used (methods.md §2.2).
"""
from __future__ import annotations

import torch

from ..counting import decoder_linears
from .base import CompressionMethod, Factors, register_method
from .linalg import DecompositionError, floored_scales, truncated_svd_factors

AXES = ("rows", "columns")


def fisher_reductions(model, adapter, calib_ids: torch.Tensor, device, batch_size: int = 1
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{full module name: (row sums, column sums)} of the mean squared LM-loss gradient (fp64, CPU)."""
    specs = decoder_linears(model, adapter)
    modules = {s.name: model.get_submodule(s.name) for s in specs}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    original_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else original_device
    sums = {name: (torch.zeros(m.out_features, dtype=torch.float64), torch.zeros(m.in_features, dtype=torch.float64))
            for name, m in modules.items()}
    passes = 0
    try:
        model.to(device)
        for p in params:
            p.requires_grad_(False)
        for m in modules.values():
            m.weight.requires_grad_(True)
            m.weight.grad = None
        with torch.enable_grad():
            for batch in calib_ids.split(batch_size):
                batch = batch.to(device)
                loss = model(batch, labels=batch, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise DecompositionError("FWSVD: non-finite LM loss on the calibration data")
                loss.backward()
                for name, m in modules.items():
                    g2 = m.weight.grad.detach().to(torch.float64).pow_(2)
                    sums[name][0].add_(g2.sum(1).cpu())
                    sums[name][1].add_(g2.sum(0).cpu())
                    m.weight.grad = None
                passes += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
        model.to(original_device)
    if passes == 0:
        raise DecompositionError("FWSVD needs calibration data: no backward pass ran")
    return {name: (rows / passes, cols / passes) for name, (rows, cols) in sums.items()}


def importance_scales(values: torch.Tensor, alpha: float, floor: float) -> tuple[torch.Tensor, int]:
    return floored_scales(values, alpha, floor, "Fisher importance (FWSVD; no gradient reached this matrix?)")


@register_method
class FWSVD(CompressionMethod):
    name = "fwsvd"
    summary = "FWSVD: SVD of diag(√Fisher)·W, Fisher from squared LM-loss gradients (Hsu et al. 2022); axis=rows|columns"

    def __init__(self, axis: str = "rows", alpha: float = 0.5, floor: float = 1e-6, batch_size: int = 1):
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        if not 0 < float(floor) < 1:
            raise ValueError(f"floor must lie in (0, 1), got {floor}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.axis, self.alpha, self.floor, self.batch_size = axis, float(alpha), float(floor), int(batch_size)
        self.importance: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare(self, model, adapter, calib_ids: torch.Tensor, device) -> None:
        self.importance = fisher_reductions(model, adapter, calib_ids, device, self.batch_size)

    def factorize(self, weight: torch.Tensor, rank: int, stats, name: str = "") -> Factors:
        if name not in self.importance:
            raise DecompositionError(f"FWSVD has no Fisher importance for {name!r}: prepare() must run first")
        rows, cols = self.importance[name]
        values = rows if self.axis == "rows" else cols
        scales, floored = importance_scales(values.to(weight.device), self.alpha, self.floor)
        if self.axis == "rows":
            A_scaled, B, _ = truncated_svd_factors(scales[:, None] * weight, rank)
            A = A_scaled / scales[:, None]
        else:
            A, B_scaled, _ = truncated_svd_factors(weight * scales, rank)
            B = B_scaled / scales
        return Factors(A, B, {"axis": self.axis, "floored": floored})
