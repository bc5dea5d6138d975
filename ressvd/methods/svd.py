"""Plain SVD: truncate W itself, ignoring activations (methods.md §2.1)."""
import torch

from .base import CompressionMethod, Factors, register_method
from .linalg import truncated_svd_factors


@register_method
class PlainSVD(CompressionMethod):
    name = "svd"
    summary = "plain truncated SVD of W; ignores activations (baseline)"

    def factorize(self, weight: torch.Tensor, rank: int, stats, name: str = "") -> Factors:
        A, B, _ = truncated_svd_factors(weight, rank)
        return Factors(A, B)
