"""SVD-LLM V2 truncation (methods.md §2.5, Algorithm 2): eigen whitening instead of Cholesky.

XXᵀ = U Λ Uᵀ (fp64), D = W·U·Λ^½, D = U_d Σ V_dᵀ, and W′ = U_d,r Σ_r V_d,rᵀ Λ^−½ Uᵀ (the printed
algorithm drops V_d; Theorem 3.1 has it). Eigenvalues at or below `eig_floor`·λ_max are treated as
zero, so Λ^−½ Uᵀ is a pseudo-inverse: a singular Gram (dead input channels, fewer tokens than
features) needs no diagonal shift, and the loss ||(W − W′)X||_F is still the theoretical minimum
(Σ_{j>r} σ_j(D)²)^½. With `--allocation v2` this is the full SVD-LLM V2 method.
"""
import torch

from .base import CompressionMethod, Spectrum, register_method
from .linalg import eigen_whitening, svd


@register_method
class SVDLLMV2(CompressionMethod):
    name = "svd-llm-v2"
    summary = ("SVD-LLM V2 truncation: SVD of W·U·Λ^½ from XXᵀ = UΛUᵀ, pseudo-inverse for singular Grams "
               "(Wang et al. 2025); full V2 with --allocation v2")

    def __init__(self, eig_floor: float = 1e-10):
        self.eig_floor = float(eig_floor)
        if not 0 <= self.eig_floor < 1:
            raise ValueError(f"eig_floor must lie in [0, 1), got {eig_floor}")

    def spectrum(self, weight: torch.Tensor, stats, name: str = "") -> Spectrum:
        whitening = stats.cached(f"eigen:{self.eig_floor}", lambda: eigen_whitening(stats.primary.gram,
                                                                                    self.eig_floor))
        U, sigma, Vh = svd(weight @ whitening.S)
        return Spectrum(U, sigma, Vh, whitening.right_divide, {"null_dims": whitening.dropped})
