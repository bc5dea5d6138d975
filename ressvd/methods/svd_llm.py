"""SVD-LLM whitening (methods.md §2.4): truncate W·S with S = chol(XX^T), then fold S^-1 into B.

The result is the exact minimiser of ||(W - W')X||_F at rank r, and that loss equals the root of
the sum of the dropped squared singular values of W·S. Option output="fisher" weighs the output
side too (output_fisher.py): the truncation of Lᵀ·W·S. Option shrink=α whitens
(1 − α)·XXᵀ + α·diag(XXᵀ) instead (linalg.shrunk_whitening): a noisy 16-sequence Gram tempered.
"""
import torch

from .base import CompressionMethod, Spectrum, register_method
from .linalg import check_shrink, right_divide_lower, shrunk_whitening, svd
from .output_fisher import OUTPUT_MODES, OutputFisher, OutputWeighted


@register_method
class SVDLLM(OutputWeighted, CompressionMethod):
    name = "svd-llm"
    refit_is_identity = True  # exact when no diagonal shift was needed (then H is only nearly XXᵀ)
    summary = ("SVD-LLM truncation-aware whitening: SVD of W·chol(XXᵀ) (Wang et al. 2024); "
               "output=fisher also weighs the outputs by the LM-loss gradients (K-FAC); "
               "shrink=α whitens a Gram shrunk towards its diagonal")

    def __init__(self, output: str = "none", output_power: float = 0.5, output_ridge: float = 1e-3,
                 shrink: float = 0.0):
        self.output_fisher = output_weighting(output, output_power, output_ridge)
        self.shrink = check_shrink(shrink)
        if self.output_fisher is not None or self.shrink:
            # the factors minimise an output-weighted or shrunk objective, not ||(W − W′)X|| itself
            self.refit_is_identity = False

    def spectrum(self, weight: torch.Tensor, stats, name: str = "") -> Spectrum:
        return whitened_spectrum(weight, primary_whitening(stats, self.shrink), self.output_fisher, name)


def primary_whitening(stats, shrink: float):
    """The Cholesky whitening of the primary stream's Gram, shrunk by `shrink`, shared by a group's linears."""
    key = f"cholesky shrink={shrink}" if shrink else "cholesky"
    return stats.cached(key, lambda: shrunk_whitening(stats.primary.gram, shrink))


def output_weighting(output: str, power: float, ridge: float) -> OutputFisher | None:
    """The method options' output side: None for "none", else an OutputFisher to prepare."""
    if output not in OUTPUT_MODES:
        raise ValueError(f"output must be one of {OUTPUT_MODES}, got {output!r}")
    return OutputFisher(power, ridge) if output == "fisher" else None


def whitened_spectrum(weight: torch.Tensor, whitening, output_fisher: OutputFisher | None, name: str) -> Spectrum:
    """SVD of W·S, or of Lᵀ·W·S with the output Fisher (its left vectors mapped back by L⁻ᵀ)."""
    if output_fisher is None:
        U, sigma, Vh = svd(weight @ whitening.S)
        info = {"shift": whitening.shift}
    else:
        T = output_fisher.factor(name, weight.device)
        U, sigma, Vh = svd(T @ weight @ whitening.S)
        U = output_fisher.unweigh(T, U)
        info = {"shift": whitening.shift, "output": "fisher"}
    return Spectrum(U, sigma, Vh, lambda B_white: right_divide_lower(B_white, whitening.S), info)
