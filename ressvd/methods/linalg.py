"""Shared linear algebra: whitening square roots and truncated factors, all in float64."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("ressvd")


class DecompositionError(RuntimeError):
    """A factorisation failed. Never substitute a layer: stop and say which one."""


@dataclass
class Whitening:
    """H ~ S S^T with S lower triangular; `shift` is what was added to the diagonal (0 when PD)."""

    S: torch.Tensor
    shift: float


def cholesky_whitening(H: torch.Tensor, relative_shift: float = 1e-6, max_tries: int = 6) -> Whitening:
    """Cholesky factor of H (fp64). When H is not positive definite, shift its diagonal by
    -lambda_min plus a fraction of its mean diagonal (scale-aware, unlike a fixed 1e-6) and retry."""
    H = H.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return Whitening(L, 0.0)
    scale = float(H.diagonal().abs().mean().clamp_min(torch.finfo(torch.float64).tiny))
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    shift = max(-lam_min, 0.0) + relative_shift * scale
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + shift * eye)
        if int(info) == 0:
            log.info("Gram matrix not positive definite: shifted its diagonal by %.3g (%.2g of mean diag)",
                     shift, shift / scale)
            return Whitening(L, shift)
        shift *= 10
    raise DecompositionError(f"Cholesky failed even after a diagonal shift of {shift:.3g}")


def truncated_svd_factors(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M ~ A B with A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T. Returns (A, B, all singular values)."""
    try:
        U, sigma, Vh = torch.linalg.svd(M, full_matrices=False)
    except RuntimeError as err:  # LinAlgError subclasses RuntimeError
        raise DecompositionError(f"SVD failed on a {tuple(M.shape)} matrix: {err}") from err
    if not torch.isfinite(sigma).all():
        raise DecompositionError("SVD produced non-finite singular values")
    root = sigma[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank], sigma


def right_divide_lower(B: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """B S^-1 for lower-triangular S, by a triangular solve instead of an explicit inverse."""
    return torch.linalg.solve_triangular(S, B, upper=False, left=False)
