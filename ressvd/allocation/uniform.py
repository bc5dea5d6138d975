"""Uniform allocation: every decoder linear at the same ratio (SVD-LLM, ASVD, FWSVD papers)."""
from .base import Allocator, Ranks, finalize, register_allocator
from .ranks import MatrixSpec, rank_for_ratio


@register_allocator
class UniformAllocation(Allocator):
    name = "uniform"
    summary = "the same ratio for every decoder linear: rank = ⌊(1−ratio)·mn/(m+n)⌋"

    def allocate(self, matrices: list[MatrixSpec], ratio: float, num_layers: int, statistics=None, weights=None) -> Ranks:
        return finalize(matrices, {m.name: rank_for_ratio(m.out_features, m.in_features, ratio) for m in matrices})
