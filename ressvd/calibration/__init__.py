from .engine import CompressionPlan, EngineOptions, compress_layerwise
from .stats import GroupStats, InputStats

__all__ = ["CompressionPlan", "EngineOptions", "GroupStats", "InputStats", "compress_layerwise"]
