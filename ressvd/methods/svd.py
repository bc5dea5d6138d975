"""Plain SVD: truncate W itself, ignoring activations (methods.md §2.1)."""
import torch

from .base import CompressionMethod, Spectrum, register_method
from .linalg import svd


@register_method
class PlainSVD(CompressionMethod):
    name = "svd"
    summary = "plain truncated SVD of W; ignores activations (baseline)"

    def spectrum(self, weight: torch.Tensor, stats, name: str = "") -> Spectrum:
        return Spectrum(*svd(weight))
