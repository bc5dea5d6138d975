from .lowrank import LowRankLinear
from .replace import replace_submodule

__all__ = ["LowRankLinear", "replace_submodule"]
