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


def check_shrink(shrink: float) -> float:
    """The whitening methods' `shrink` option: a fraction in [0, 1)."""
    shrink = float(shrink)
    if not 0 <= shrink < 1:
        raise ValueError(f"shrink must lie in [0, 1) (the weight of diag(XXᵀ) in the Gram), got {shrink}")
    return shrink


def shrunk_whitening(H: torch.Tensor, shrink: float = 0.0) -> Whitening:
    """Cholesky whitening of (1 − shrink)·H + shrink·diag(H) (fp64).

    A few thousand calibration tokens give a noisy estimate of XXᵀ; SVD-LLM then fits directions
    the calibration text happened to excite and trusts their off-diagonal structure too much.
    Shrinking towards the diagonal (the target of Schäfer and Strimmer's covariance shrinkage)
    keeps each channel's energy and tempers the correlations. The factors are then the exact rank-r minimiser of
    ||(W − W′)·S_shrunk||_F, not of ||(W − W′)·X||_F. shrink = 0 is H unchanged.
    """
    if not shrink:
        return cholesky_whitening(H)
    H = H.to(torch.float64)
    return cholesky_whitening((1 - shrink) * H + shrink * torch.diag(H.diagonal()))


def floored_scales(values: torch.Tensor, alpha: float, floor: float, what: str) -> tuple[torch.Tensor, int]:
    """values^alpha per channel with the zeros lifted to floor·max (ASVD's activation means, FWSVD's
    Fisher sums): a zero scale would make the scaled SVD singular. Returns (scales, how many were floored)."""
    if not torch.isfinite(values).all():
        raise DecompositionError(f"non-finite {what}")
    scales = values.to(torch.float64).pow(alpha)
    top = float(scales.max())
    if not top > 0:
        raise DecompositionError(f"every {what} is zero")
    low = scales <= floor * top
    return scales.clamp_min(floor * top), int(low.sum())


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A singular pair (u, v) is defined only up to a common sign, and the LAPACK path (SIMD width,
    threads, batch order of the Gram sums) can pick either: make the largest-|u| entry of each u
    positive, so the factors, not only their product, are reproducible."""
    index = U.abs().argmax(dim=0)
    signs = torch.sign(U[index, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


def truncated_svd_factors(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M ~ A B with A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T. Returns (A, B, all singular values)."""
    U, sigma, Vh = svd(M)
    root = sigma[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank], sigma


def right_divide_lower(B: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """B S^-1 for lower-triangular S, by a triangular solve instead of an explicit inverse."""
    return torch.linalg.solve_triangular(S, B, upper=False, left=False)


@dataclass
class EigenWhitening:
    """H ~ S S^T with S = U_k Λ_k^½ (n x k), from the eigendecomposition H = U Λ U^T (fp64).

    Eigenvalues at or below `relative_floor`·λ_max are treated as zero: their directions are
    dropped (k < n), and S⁺ = Λ_k^−½ U_k^T is then the pseudo-inverse. Directions without
    activation energy do not enter ||(W − W')X||_F, so nothing is shifted or invented.
    """

    U: torch.Tensor  # (n, k) kept eigenvectors
    root: torch.Tensor  # (k,) sqrt of the kept eigenvalues
    dropped: int  # directions treated as null (n - k)
    floor: float  # the absolute eigenvalue floor that was applied

    @property
    def S(self) -> torch.Tensor:
        return self.U * self.root

    def right_divide(self, B: torch.Tensor) -> torch.Tensor:
        """B S⁺ = B Λ_k^−½ U_k^T for B with k columns."""
        return (B / self.root) @ self.U.T


def eigen_whitening(H: torch.Tensor, relative_floor: float = 1e-10) -> EigenWhitening:
    """Eigen square root of a PSD Gram matrix, singular or not (SVD-LLM V2, methods.md §2.5, §1.6)."""
    H = H.to(torch.float64)
    if not torch.isfinite(H).all():
        raise DecompositionError("Gram matrix has non-finite entries")
    try:
        lam, U = torch.linalg.eigh(H)
    except RuntimeError as err:
        raise DecompositionError(f"eigendecomposition failed on a {tuple(H.shape)} Gram matrix: {err}") from err
    top = float(lam[-1])
    if not top > 0:
        raise DecompositionError("Gram matrix has no positive eigenvalue (all inputs are zero)")
    floor = relative_floor * top
    keep = lam > floor
    dropped = int((~keep).sum())
    if dropped:
        log.info("Gram matrix: %d of %d eigenvalues at or below %.3g·λ_max treated as zero (pseudo-inverse)",
                 dropped, H.shape[0], relative_floor)
    return EigenWhitening(U[:, keep], lam[keep].sqrt(), dropped, floor)


def svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD M = U diag(sigma) Vh, raising DecompositionError instead of returning garbage."""
    try:
        U, sigma, Vh = torch.linalg.svd(M, full_matrices=False)
    except RuntimeError as err:
        raise DecompositionError(f"SVD failed on a {tuple(M.shape)} matrix: {err}") from err
    if not torch.isfinite(sigma).all():
        raise DecompositionError("SVD produced non-finite singular values")
    U, Vh = _fix_signs(U, Vh)
    return U, sigma, Vh


def psd_right_solve(R: torch.Tensor, P: torch.Tensor, relative_floor: float = 1e-12) -> tuple[torch.Tensor, bool]:
    """R P⁻¹ for symmetric PSD P: a Cholesky solve when P is positive definite, else R P⁺ with
    eigenvalues at or below relative_floor·λ_max treated as zero (the minimum-norm least-squares
    solution). Returns (solution, whether the pseudo-inverse was needed)."""
    P = (P + P.T) / 2
    L, info = torch.linalg.cholesky_ex(P)
    if int(info) == 0:
        X = torch.cholesky_solve(R.T, L).T
        if torch.isfinite(X).all():
            return X, False
    lam, U = torch.linalg.eigh(P)
    if not float(lam[-1]) > 0:
        raise DecompositionError("least-squares system has no positive eigenvalue")
    keep = lam > relative_floor * float(lam[-1])
    log.info("least-squares system singular: %d of %d directions dropped (pseudo-inverse)",
             int((~keep).sum()), P.shape[0])
    return ((R @ U[:, keep]) / lam[keep]) @ U[:, keep].T, True
