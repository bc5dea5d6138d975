"""SVD-LLM whitening followed by its closed-form update of the left factor (methods.md §2.4;
arXiv v1, `--step 2` of the reference code).

1. Whitened truncation from the **dense** statistics: W·S = U Σ Vᵀ with S Sᵀ = H = XXᵀ; keep Σ_r
   and V′ = V_rᵀ S⁻¹ (r x n).
2. Refit the left factor by least squares against the dense layer's outputs W·X̃ on the inputs X̃
   that the already-compressed prefix produces:  A* = argmin_A ||W X̃ − A Σ_r V′ X̃||_F.
   The normal equations only need the compressed-stream Gram H̃ = X̃ X̃ᵀ:
       A* = W H̃ V′ᵀ Σ (Σ V′ H̃ V′ᵀ Σ)⁻¹,
   solved here as M = W H̃ V′ᵀ (V′ H̃ V′ᵀ)⁻¹ = A* Σ (Σ is diagonal and invertible).
3. Factors A = A* Σ^½ = M Σ^−½, B = Σ^½ V′ (so A B = M V′).

Without the update (M = U_r Σ_r) the right factor is the same, so the update can never be worse
on its own objective ||(W − W′)X̃||_F. The target is W X̃, not the dense output W X (that is the
error-controlled fit of §2.8).
"""
import torch

from .base import CompressionMethod, Factors, register_method
from .linalg import cholesky_whitening, eigen_whitening, psd_right_solve, right_divide_lower, svd

WHITENINGS = ("cholesky", "eigen")


@register_method
class SVDLLMUpdate(CompressionMethod):
    name = "svd-llm-update"
    summary = ("SVD-LLM whitening (dense statistics) + closed-form least-squares update of the left factor "
               "on the compressed model's inputs (Wang et al. 2024, v1)")
    streams = frozenset({"dense", "compressed"})

    def __init__(self, whitening: str = "cholesky", eig_floor: float = 1e-10):
        if whitening not in WHITENINGS:
            raise ValueError(f"whitening must be one of {WHITENINGS}, got {whitening!r}")
        self.whitening, self.eig_floor = whitening, float(eig_floor)

    def dense_prefix_equivalent(self) -> CompressionMethod:
        """On a dense prefix X̃ = X, and the update of step 2 is the identity (SVD-LLM's A is already
        the least-squares solution on X): SVD-LLM itself, with Cholesky whitening."""
        if self.whitening != "cholesky":
            return self
        from .svd_llm import SVDLLM
        return SVDLLM()

    def factorize(self, weight: torch.Tensor, rank: int, stats, name: str = "") -> Factors:
        dense, compressed = stats.dense, stats.compressed
        if dense is None or compressed is None:
            raise ValueError("svd-llm-update needs both the dense and the compressed-prefix statistics")
        info = {}
        if self.whitening == "cholesky":
            w = stats.cached("cholesky:dense", lambda: cholesky_whitening(dense.gram))
            U, sigma, Vh = svd(weight @ w.S)
            V_prime = right_divide_lower(Vh[:rank], w.S)
            info["shift"] = w.shift
        else:
            w = stats.cached(f"eigen:dense:{self.eig_floor}", lambda: eigen_whitening(dense.gram, self.eig_floor))
            U, sigma, Vh = svd(weight @ w.S)
            V_prime = w.right_divide(Vh[:rank])
            info["null_dims"] = w.dropped
        H_tilde = compressed.gram.to(torch.float64)
        HV = H_tilde @ V_prime.T  # (n, r)
        M, pinv = psd_right_solve(weight @ HV, V_prime @ HV)
        info["update_pinv"] = pinv
        root = sigma[:rank].sqrt()
        root = root.clamp_min(1e-8 * float(root[0]) if float(root[0]) > 0 else 1.0)  # any positive split keeps A B
        return Factors(M / root, root[:, None] * V_prime, info)
