from .base import CompressionMethod, Factors, available_methods, get_method, register_method
from .linalg import DecompositionError

__all__ = ["CompressionMethod", "DecompositionError", "Factors", "available_methods", "get_method",
           "register_method"]
