"""Swap a submodule by its dotted name."""
from torch import nn


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


def replace_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
