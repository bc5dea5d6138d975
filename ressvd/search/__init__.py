from .partial_layers import SearchPoint, search_partial_layers

__all__ = ["SearchPoint", "search_partial_layers"]
