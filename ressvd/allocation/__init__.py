from .base import AllocationContext, AllocationResult, Allocator, allocation_inputs, available_allocators, get_allocator, register_allocator
from .ranks import MatrixSpec, factorization_saves, rank_for_ratio, validate_ratio

__all__ = ["AllocationContext", "AllocationResult", "Allocator", "MatrixSpec", "allocation_inputs", "available_allocators", "factorization_saves", "get_allocator",
           "rank_for_ratio", "register_allocator", "validate_ratio"]
