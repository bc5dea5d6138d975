"""Refit: the least-squares update of the left factor on the compressed prefix's inputs, for any
method (methods.md §2.4, SVD-LLM's closed-form update made a stage: `--refit`).

Given a method's factors W ≈ A B and the statistics of the linear's inputs, keep B and solve for A:
- target "compressed": min_A ||W X̃ − A B X̃||_F, X̃ the inputs the compressed prefix produces
  (SVD-LLM's update): A (B H̃ Bᵀ) = W H̃ Bᵀ with H̃ = X̃ X̃ᵀ;
- target "anchored": min_A ||W X − A B X̃||_F, the dense layer's output W X on the dense inputs as
  target (AA-SVD's obj4): A (B H̃ Bᵀ) = W C Bᵀ with the cross Gram C = X X̃ᵀ.
`ridge` > 0 adds ridge·mean(diag(B H̃ Bᵀ))·||A||² (directions the calibration inputs barely excite
get no huge coefficients). The objective is evaluated from the Grams before and after, and the
refitted A is kept only if it does not increase it (rounding in a nearly singular system could).
"""
from __future__ import annotations

import torch

from ..methods.linalg import psd_right_solve

REFIT_TARGETS = ("compressed", "anchored")


def _objective(W, A, B, stats, target: str) -> float:
    """||W X̃ − A B X̃||² (compressed) or ||W X − A B X̃||² (anchored), from the Grams alone."""
    H_c = stats.compressed.gram.to(torch.float64)
    AB = A @ B
    if target == "compressed":
        D = W - AB
        return float(torch.einsum("ij,jk,ik->", D, H_c, D))
    H_d = stats.dense.gram.to(torch.float64)
    C = stats.cross.to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", W, H_d, W) - 2 * torch.einsum("ij,jk,ik->", W, C, AB)
                 + torch.einsum("ij,jk,ik->", AB, H_c, AB))


def refit_left_factor(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, stats, target: str = "compressed",
                      ridge: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The refitted A (B unchanged) and a record: the objective before and after, and whether the
    least-squares system needed its pseudo-inverse."""
    if target not in REFIT_TARGETS:
        raise ValueError(f"refit target must be one of {REFIT_TARGETS}, got {target!r}")
    if stats.compressed is None or (target == "anchored" and (stats.dense is None or stats.cross is None)):
        raise RuntimeError(f"refit ({target}) needs the compressed-prefix statistics"
                           + (" and the dense ones with their cross term" if target == "anchored" else ""))
    W, A, B = W.to(torch.float64), A.to(torch.float64), B.to(torch.float64)
    H_c = stats.compressed.gram.to(torch.float64)
    BH = B @ H_c  # (r, n)
    P = BH @ B.T  # B H̃ Bᵀ (r, r)
    if ridge:
        P = P + ridge * float(P.diagonal().mean()) * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    R = W @ BH.T if target == "compressed" else W @ stats.cross.to(torch.float64) @ B.T
    refitted, pinv = psd_right_solve(R, P)
    before, after = _objective(W, A, B, stats, target), _objective(W, refitted, B, stats, target)
    kept = torch.isfinite(refitted).all() and after <= before
    return (refitted if kept else A), {"target": target, "ridge": ridge, "objective_before": before,
                                       "objective_after": after if kept else before, "pinv": pinv,
                                       "kept": bool(kept)}
