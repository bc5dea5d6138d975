from .lowrank import LowRankLinear
from .replace import get_submodule, replace_submodule

__all__ = ["LowRankLinear", "get_submodule", "replace_submodule"]
