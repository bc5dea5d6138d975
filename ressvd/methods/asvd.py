"""ASVD, activation-aware SVD (methods.md §2.3): S = diag(a_j^α) with a_j the mean |x_j| over the
calibration tokens, W′ = trunc_r(W·S)·S⁻¹, so the loss ||(W − W′)S||_F is the root of the dropped
squared singular values of W·S. Uniform ranks here (ASVD's STRS rank search is not implemented).

Dead channels (a_j = 0) would make S singular: a_j^α is floored at `floor`·max_j a_j^α and the
number of floored channels is recorded.
"""
import torch

from .base import CompressionMethod, Factors, register_method
from .linalg import DecompositionError, floored_scales, truncated_svd_factors


def activation_scales(abs_sum: torch.Tensor, tokens: int, alpha: float, floor: float) -> tuple[torch.Tensor, int]:
    if tokens <= 0:
        raise DecompositionError("ASVD needs calibration tokens: no activations were recorded")
    return floored_scales(abs_sum.to(torch.float64) / tokens, alpha, floor, "mean absolute activation (ASVD)")


@register_method
class ASVD(CompressionMethod):
    name = "asvd"
    summary = "ASVD: SVD of W·diag(mean|x|^α), α = 0.5, scale folded back into B (Yuan et al. 2023)"

    def __init__(self, alpha: float = 0.5, floor: float = 1e-6):
        self.alpha, self.floor = float(alpha), float(floor)
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not 0 < self.floor < 1:
            raise ValueError(f"floor must lie in (0, 1), got {floor}")

    def factorize(self, weight: torch.Tensor, rank: int, stats, name: str = "") -> Factors:
        primary = stats.primary
        scales, floored = stats.cached(f"asvd:{self.alpha}:{self.floor}", lambda: activation_scales(
            primary.abs_sum, primary.tokens, self.alpha, self.floor))
        A, B_scaled, _ = truncated_svd_factors(weight * scales, rank)
        return Factors(A, B_scaled / scales, {"floored_channels": floored})
