"""ResSVD / ERC-SVD residual compensation (REC), methods.md §2.6–2.8.

Total rank r = r1 + r2 with r2 = floor(beta·mn/(m+n)). Stage 1 is SVD-LLM's whitened truncation of
W to rank r1 (with the run's primary statistics); stage 2 truncates the residual R = W − W1 to
rank r2; both factor pairs are concatenated into one rank-r LowRankLinear.

Stage 2 modes (`residual`):
- "same": whiten R with the same S. Provably equal to SVD-LLM at rank r (§2.7); kept as a check.
- "plain": truncate R without whitening (one literal reading of the paper).
- "error-controlled": fit what the layer really gets inside the partly compressed model:
  min over rank-r2 R2 of ||W X − (W1 + R2) X~||_F, X the dense input, X~ the compressed-prefix
  input. Closed form (§2.8): R2 = trunc_r2(W C S~^-T − W1 S~) S~^-1, with C = X X~^T, S~ S~^T = X~ X~^T.
  `ridge` > 0 adds ridge·mean(diag X~X~^T)·||R2||_F² to the objective. Then S~ S~^T = X~ X~^T + λI and
  R2 = trunc_r2((W C − W1 X~X~^T) S~^-T) S~^-1: directions in which the calibration inputs barely
  vary no longer get coefficients of size 1/sqrt(eigenvalue).

Option output="fisher" (with residual "same") weighs the outputs by the LM-loss gradients as in
svd-llm (output_fisher.py); the sensitivity probes share the prepared weighting. Option shrink=α
shrinks the Gram of stage 1 and of the "same" residual towards its diagonal, as svd-llm's does.
"""
from __future__ import annotations

import math

import torch

from .base import CompressionMethod, Factors, register_method
from .linalg import check_shrink, cholesky_whitening, right_divide_lower, truncated_svd_factors
from .output_fisher import OutputWeighted

RESIDUAL_MODES = ("same", "plain", "error-controlled")


def residual_rank(out_features: int, in_features: int, rank: int, beta: float) -> int:
    """r2 = floor(beta·mn/(m+n)), leaving stage 1 at least rank 1."""
    r2 = math.floor(beta * out_features * in_features / (out_features + in_features))
    return max(0, min(r2, rank - 1))


@register_method
class ResSVD(OutputWeighted, CompressionMethod):
    name = "ressvd"
    summary = ("ResSVD/ERC-SVD residual compensation: whitened rank-r1 truncation plus a rank-r2 "
               "residual stage (--residual same|plain|error-controlled), compressed-prefix statistics, "
               "per-layer ratios by measured sensitivity (PLC: --allocation partial-layer)")
    default_stats = "compressed"
    # Sensitivity, not ResSVD's own PLC: on the validation sets (docs/BENCHMARKS.md, session 10) it
    # wins at 0.2 (SmolLM2-135M: PTB valid 116 against 182 for PLC's searched k = 27; Gemma-3-270M
    # 703 against 1384) and at 0.4 on Gemma (1658 against 2290), splits SmolLM2 at 0.4 (PTB valid 449
    # against 468, C4 val 244 against 229), costs less than PLC's k search, and heals far better.
    default_allocation = "sensitivity"

    # Default "same" (≡ SVD-LLM at rank r) because it measured best overall (SmolLM2-135M, WikiText-2
    # PPL; docs/BENCHMARKS.md, ResSVD ablation): "error-controlled" breaks the model (19,338 against
    # 233 at 0.2, uniform; 1,656 with ridge 0.1); "plain" won at 0.2 with PLC (147 against 158, where
    # the search also chose another k) and lost at 0.4 with the same k (442 against 413).
    def __init__(self, residual: str = "same", beta: float = 0.05, ridge: float = 0.0, output: str = "none",
                 output_power: float = 0.5, output_ridge: float = 1e-3, shrink: float = 0.0):
        from .svd_llm import output_weighting
        self.output_fisher = output_weighting(output, output_power, output_ridge)
        self.shrink = check_shrink(shrink)
        if self.output_fisher is not None and residual != "same":
            raise ValueError(f"output=fisher works with residual 'same' only, got {residual!r}")
        if residual not in RESIDUAL_MODES:
            raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        if not ridge >= 0:
            raise ValueError(f"ridge must be >= 0 (a fraction of the mean diagonal of X~X~^T), got {ridge}")
        self.residual, self.beta, self.ridge = residual, float(beta), float(ridge)
        if residual == "error-controlled":
            # instance attributes override the class defaults the engine reads
            self.streams = frozenset({"dense", "compressed"})
            self.needs_cross = True

    def dense_prefix_equivalent(self) -> CompressionMethod:
        """With residual "same", SVD-LLM at the same total rank (§2.7): one decomposition instead
        of two SVDs, and a spectrum the sensitivity probes truncate for every candidate ratio."""
        if self.residual != "same":
            return self
        from .svd_llm import SVDLLM
        equivalent = SVDLLM(shrink=self.shrink)
        if self.output_fisher is not None:  # the same prepared output Fisher, shared
            equivalent.output_fisher, equivalent.refit_is_identity = self.output_fisher, False
        return equivalent

    def factorize(self, weight: torch.Tensor, rank: int, stats, name: str = "") -> Factors:
        m, n = weight.shape
        r2 = residual_rank(m, n, rank, self.beta)
        r1 = rank - r2
        from .svd_llm import primary_whitening
        white = primary_whitening(stats, self.shrink)
        if self.output_fisher is not None:
            # "same" in the output-weighted coordinates is, as without them, the rank-r truncation
            from .svd_llm import whitened_spectrum
            factors = whitened_spectrum(weight, white, self.output_fisher, name).factors(rank)
            factors.info.update(r1=r1, r2=r2, residual=self.residual)
            return factors
        A1, B1_white, _ = truncated_svd_factors(weight @ white.S, r1)
        B1 = right_divide_lower(B1_white, white.S)
        info = {"shift": white.shift, "r1": r1, "r2": r2, "residual": self.residual}
        if r2 == 0:
            return Factors(A1, B1, info)

        if self.residual == "same":
            residual_white = weight @ white.S - A1 @ B1_white
            A2, B2_white, _ = truncated_svd_factors(residual_white, r2)
            B2 = right_divide_lower(B2_white, white.S)
        elif self.residual == "plain":
            A2, B2, _ = truncated_svd_factors(weight - A1 @ B1, r2)
        else:
            target_white, gram_white, comp_white = stats.cached(
                f"error-controlled ridge={self.ridge}", lambda: self._error_whitening(stats, self.ridge))
            # (W C − W1 X~X~^T) S~^-T, in the compressed-input whitened coordinates
            M = weight @ target_white - (A1 @ B1) @ gram_white
            A2, B2_white, _ = truncated_svd_factors(M, r2)
            B2 = right_divide_lower(B2_white, comp_white.S)
            info["shift_compressed"] = comp_white.shift
        return Factors(torch.cat([A1, A2], dim=1), torch.cat([B1, B2], dim=0), info)

    @staticmethod
    def _error_whitening(stats, ridge: float):
        """(C S~^-T, X~X~^T S~^-T, S~) shared by the linears of one input group."""
        if stats.cross is None or stats.compressed is None:
            raise RuntimeError("error-controlled residual needs dense/compressed statistics and their cross term")
        gram = stats.compressed.gram.to(torch.float64)
        if ridge:
            penalty = ridge * float(gram.diagonal().mean())
            comp = cholesky_whitening(gram + penalty * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
            gram_white = torch.linalg.solve_triangular(comp.S, gram, upper=False).T  # X~X~^T S~^-T (symmetric)
        else:
            comp = cholesky_whitening(gram)
            gram_white = comp.S  # X~X~^T S~^-T = S~ exactly (up to the Cholesky safeguard's shift)
        # C S~^-T = (S~^-1 C^T)^T, by a triangular solve
        C = stats.cross.to(torch.float64)
        target = torch.linalg.solve_triangular(comp.S, C.T, upper=False).T
        return target, gram_white, comp
