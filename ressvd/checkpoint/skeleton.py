"""Rebuild the low-rank module structure of a compressed model from its recorded ranks."""
from __future__ import annotations

from torch import nn

from .format import CorruptCheckpointError
from .runtime import swap_in_lowrank


def apply_lowrank_skeleton(model: nn.Module, ranks: dict[str, int]) -> None:
    # The loaders' own swap, so a resumed layer gets exactly the modules a loaded checkpoint has.
    swap_in_lowrank(model, ranks, CorruptCheckpointError)
