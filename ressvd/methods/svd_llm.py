"""SVD-LLM whitening (methods.md §2.4): truncate W·S with S = chol(XX^T), then fold S^-1 into B.

The result is the exact minimiser of ||(W - W')X||_F at rank r, and that loss equals the root of
the sum of the dropped squared singular values of W·S.
"""
import torch

from .base import CompressionMethod, Spectrum, register_method
from .linalg import cholesky_whitening, right_divide_lower, svd


@register_method
class SVDLLM(CompressionMethod):
    name = "svd-llm"
    refit_is_identity = True  # exact when no diagonal shift was needed (then H is only nearly XXᵀ)
    summary = "SVD-LLM truncation-aware whitening: SVD of W·chol(XXᵀ) (Wang et al. 2024)"

    def spectrum(self, weight: torch.Tensor, stats, name: str = "") -> Spectrum:
        whitening = stats.cached("cholesky", lambda: cholesky_whitening(stats.primary.gram))
        U, sigma, Vh = svd(weight @ whitening.S)
        return Spectrum(U, sigma, Vh, lambda B_white: right_divide_lower(B_white, whitening.S),
                        {"shift": whitening.shift})
